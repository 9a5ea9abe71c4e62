"""`refface comfy-queue` without a server: filling API workflows, ComfyUI's error answers, an unreachable server."""

import json
import socket
from pathlib import Path

import pytest

from refface_core import RefFaceError
from refface_core.cli import main
from refface_core.comfy_queue import INPUT_TITLE, fill_workflow, prompt_errors, unused_path

API = sorted((Path(__file__).resolve().parents[1] / "workflows" / "api").glob("*.json"))


@pytest.mark.parametrize("path", API, ids=[p.stem for p in API])
def test_fill_workflow_puts_the_photo_and_reference_folder_in(path):
    workflow = json.loads(path.read_text())
    filled = fill_workflow(workflow, "refface/abc/photo.jpg", "refface/abc/references")
    photo_nodes = [n for n in filled.values() if n["_meta"]["title"] == INPUT_TITLE]
    assert [n["inputs"]["image"] for n in photo_nodes] == ["refface/abc/photo.jpg"]
    (loader,) = [n for n in filled.values() if n["class_type"] == "RefFaceLoadReferences"]
    assert loader["inputs"]["folder"] == "refface/abc/references"
    assert not any(name.startswith("references.") for name in loader["inputs"])
    assert sum(n["class_type"] == "LoadImage" for n in filled.values()) == 1  # the reference loaders are gone
    for node in filled.values():  # no link points at a removed node
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in filled
    assert workflow == json.loads(path.read_text())  # the caller's copy is untouched


def test_fill_workflow_explains_what_a_workflow_lacks():
    with pytest.raises(RefFaceError, match="LoadImage node titled 'Input photo'"):
        fill_workflow({"1": {"class_type": "SaveImage", "inputs": {}}}, "a.png", "refs")


def test_prompt_errors_name_each_node_and_problem():
    answer = {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
        "node_errors": {
            "1": {
                "class_type": "RefFaceLoadModel",
                "errors": [{"message": "Custom validation failed for node", "details": "'refldm' is not in models"}],
            }
        },
    }
    message = prompt_errors(answer)
    assert message.startswith("ComfyUI rejected the workflow: Prompt outputs failed validation (1):")
    assert "node 1 (RefFaceLoadModel): Custom validation failed for node: 'refldm' is not in models" in message


def test_unused_path_never_overwrites(tmp_path):
    (tmp_path / "photo_restored.png").write_bytes(b"mine")
    (tmp_path / "photo_restored_1.png").write_bytes(b"mine too")
    assert unused_path(tmp_path / "photo_restored.png") == tmp_path / "photo_restored_2.png"


def test_cli_reports_an_unreachable_server_and_bad_inputs(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    photo = Path(__file__).parent / "data" / "faces" / "macron_2.jpg"
    args = ["comfy-queue", "--server", f"http://127.0.0.1:{port}", "--workflow", str(API[0]), "--input", str(photo)]
    assert main([*args, "--ref", str(photo), "--out", str(tmp_path)]) == 1
    assert f"cannot reach ComfyUI at http://127.0.0.1:{port}" in capsys.readouterr().err
    assert main([*args, "--ref", str(tmp_path / "missing.jpg"), "--out", str(tmp_path)]) == 1
    assert "image not found" in capsys.readouterr().err
    editor = tmp_path / "editor.json"
    editor.write_text(json.dumps({"nodes": [], "links": []}))
    assert main([*args[:4], str(editor), *args[5:], "--ref", str(photo), "--out", str(tmp_path)]) == 1
    assert "editor-format workflow; use the API-format one" in capsys.readouterr().err
