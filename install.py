"""Run by ComfyUI Manager and comfy-cli after `pip install -r requirements.txt`: the two installs pip cannot get right.

onnxruntime comes in builds (onnxruntime, onnxruntime-gpu, -directml, ...) that pip treats as unrelated packages, but
that share one import folder: requiring `onnxruntime`, directly or through insightface (whose every wheel requires it),
puts the CPU build over a GPU one on each install or update. So the CPU build is installed only where no build is,
and insightface without its dependencies (the ones it needs besides onnxruntime are in requirements.txt)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from importlib import metadata

ONNXRUNTIME_BUILDS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-rocm",
    "onnxruntime-silicon",
    "onnxruntime-qnn",
)
ONNXRUNTIME = "onnxruntime>=1.17"
INSIGHTFACE = "insightface>=2.1"


def installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def pip_commands(is_installed: Callable[[str], bool] = installed) -> list[list[str]]:
    """The `pip install` arguments still needed: nothing that an existing onnxruntime build or insightface covers."""
    commands = []
    if not any(is_installed(build) for build in ONNXRUNTIME_BUILDS):
        commands.append([ONNXRUNTIME])
    if not is_installed("insightface"):
        commands.append(["--no-deps", INSIGHTFACE])
    return commands


if __name__ == "__main__":
    for arguments in pip_commands():
        print("RefFace: pip install", *arguments, flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", *arguments])
