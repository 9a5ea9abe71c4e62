"""ComfyUI entry point for the RefFace node pack (the nodes live in nodes/; all computation in refface_core)."""
