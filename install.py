"""Run by ComfyUI Manager and comfy-cli after `pip install -r requirements.txt`: the two installs pip cannot get right.

onnxruntime comes in builds (onnxruntime, onnxruntime-gpu, -directml, ...) that pip treats as unrelated packages, but
that share one import folder: requiring `onnxruntime`, directly or through insightface (whose every wheel requires it),
puts the CPU build over a GPU one on each install or update. So the CPU build is installed only where no build is,
and insightface without its dependencies (the ones it needs besides onnxruntime are in requirements.txt)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from importlib import metadata

ONNXRUNTIME = "onnxruntime>=1.17"
INSIGHTFACE = "insightface>=2.1"
INSIGHTFACE_RELEASE = (2, 1)


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def pip_commands(onnxruntime_importable: bool, insightface: str | None) -> list[list[str]]:
    """The `pip install` arguments still needed: the CPU onnxruntime only where no build of it imports (whatever its
    name: -gpu, -directml, -openvino, nightlies), and insightface where it is missing or older than 2.1."""
    commands = []
    if not onnxruntime_importable:
        commands.append([ONNXRUNTIME])
    release = tuple(int(part) for part in re.findall(r"\d+", insightface or "")[:2])
    if insightface is None or release < INSIGHTFACE_RELEASE:
        commands.append(["--no-deps", "--upgrade", INSIGHTFACE])
    return commands


if __name__ == "__main__":
    for arguments in pip_commands(importlib.util.find_spec("onnxruntime") is not None, version("insightface")):
        print("RefFace: pip install", *arguments, flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", *arguments])
