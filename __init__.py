"""ComfyUI entry point for the RefFace node pack: the nodes live in nodes/, all computation in refface_core."""

import importlib.util
import os
import sys

# ComfyUI imports a pack without installing it: make refface_core (beside this file) importable. Appended, not
# prepended, so that ComfyUI's own top-level `nodes` module keeps precedence over our nodes/ package.
_PACK = os.path.dirname(os.path.abspath(__file__))
if _PACK not in sys.path:
    sys.path.append(_PACK)

if importlib.util.find_spec("comfy_api") is not None:  # inside ComfyUI; elsewhere (pip, pytest) this file is inert
    # install.py, not requirements.txt, brings these (so that an onnxruntime-gpu is kept): say so if it did not run
    _missing = [name for name in ("onnxruntime", "insightface") if importlib.util.find_spec(name) is None]
    if _missing:
        from refface_core.errors import RefFaceError

        raise RefFaceError(
            f"RefFace needs {' and '.join(_missing)}: run `python install.py` in {_PACK} with ComfyUI's Python "
            "(ComfyUI Manager runs it for you)"
        )
    from .nodes import comfy_entrypoint

    WEB_DIRECTORY = "./web"  # web/refface.js shows the nodes' reports on the nodes
    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
