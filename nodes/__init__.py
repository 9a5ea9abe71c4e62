"""ComfyUI V3 nodes for RefFace: thin wrappers over refface_core (no model math here)."""
