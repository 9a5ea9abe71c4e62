"""install.py, run by ComfyUI Manager after requirements.txt: any onnxruntime build satisfies it, none is replaced."""

import importlib.util
import re
from pathlib import Path

import pytest

from refface_core import RefFaceError

REPO = Path(__file__).resolve().parents[1]


def load_install():
    spec = importlib.util.spec_from_file_location("refface_install", REPO / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cpu_build_only_where_no_onnxruntime_build_is_and_insightface_without_its_dependencies():
    install = load_install()
    insightface = ["--no-deps", "--upgrade", "insightface>=2.1"]
    assert install.pip_commands(False, None) == [["onnxruntime>=1.17"], insightface]
    assert install.pip_commands(True, None) == [insightface]  # any build that imports: -gpu, -directml, nightlies
    assert install.pip_commands(True, "0.7.3") == [insightface]  # older than the release RefFace is tested with
    assert install.pip_commands(True, "2.1") == install.pip_commands(True, "3.0.1") == []


def test_requirements_name_neither_onnxruntime_nor_insightface():
    """pip would install the CPU build over a GPU one for either (every insightface wheel requires "onnxruntime")."""
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    names = {re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower() for line in lines if line}
    assert not {name for name in names if name.startswith(("onnxruntime", "insightface"))}
    assert {"onnx", "scikit-image", "scipy", "opencv-python"} <= names  # what insightface needs besides onnxruntime


def test_the_pack_without_onnxruntime_says_to_run_install_py(monkeypatch):
    """A manual install that ran requirements.txt only: one line at ComfyUI's start, not an import traceback."""
    real = importlib.util.find_spec
    stand_in = {"comfy_api": object(), "onnxruntime": None}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: stand_in.get(name, real(name, *a)))
    spec = importlib.util.spec_from_file_location("refface_pack", REPO / "__init__.py")
    with pytest.raises(RefFaceError, match=r"^RefFace needs onnxruntime: run `python install.py` in .*ComfyUI Manager"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
