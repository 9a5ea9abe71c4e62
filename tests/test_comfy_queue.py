"""`refface comfy-queue`: filling API workflows, ComfyUI's error answers, and the whole exchange with a stand-in
server on 127.0.0.1 that speaks ComfyUI's API (upload, /prompt, websocket events, /history, /view)."""

import asyncio
import json
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from refface_core import RefFaceError
from refface_core.cli import main
from refface_core.comfy_queue import INPUT_TITLE, fill_workflow, prompt_errors, queue_restore, unused_path

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


@pytest.fixture
def comfyui():
    """A stand-in ComfyUI: stores uploads and prompts, then plays a run's websocket events (or an error)."""
    web = pytest.importorskip("aiohttp.web")
    state = SimpleNamespace(uploads=[], prompts=[], sockets=[], error=None, result=b"\x89PNG result")

    async def upload(request):
        form = await request.post()
        state.uploads.append((form["subfolder"], form["image"].filename, form["image"].file.read()))
        return web.json_response({"name": form["image"].filename, "subfolder": form["subfolder"], "type": "input"})

    async def websocket(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        state.sockets.append(ws)
        async for _ in ws:
            pass
        return ws

    async def prompt(request):
        body = await request.json()
        state.prompts.append(body["prompt"])
        asyncio.get_running_loop().create_task(play(state.sockets[-1]))
        return web.json_response({"prompt_id": "p1", "number": 0, "node_errors": {}})

    async def play(ws):
        await ws.send_json({"type": "status", "data": {"status": {}}})  # not about the prompt: ignored
        for step in (1, 2, 3):
            await ws.send_json({"type": "progress", "data": {"value": step, "max": 3, "prompt_id": "p1", "node": "7"}})
            await ws.send_bytes(b"preview")
        if state.error:
            await ws.send_json({"type": "execution_error", "data": {"prompt_id": "p1", **state.error}})
        else:
            await ws.send_json({"type": "executing", "data": {"node": None, "prompt_id": "p1"}})

    async def history(request):
        outputs = {
            "8": {"images": [{"filename": "refface_00001_.png", "subfolder": "refface", "type": "output"}]},
            "9": {"text": ["image 0: face 0: 0.712 (same)"]},
            "10": {"images": [{"filename": "preview.png", "subfolder": "", "type": "temp"}]},
        }
        return web.json_response({"p1": {"outputs": outputs, "status": {"status_str": "success"}}})

    async def view(request):
        assert dict(request.query) == {"filename": "refface_00001_.png", "subfolder": "refface", "type": "output"}
        return web.Response(body=state.result)

    app = web.Application()
    app.add_routes([
        web.post("/upload/image", upload), web.get("/ws", websocket), web.post("/prompt", prompt),
        web.get("/history/{prompt_id}", history), web.get("/view", view),
    ])  # fmt: skip
    loop, started = asyncio.new_event_loop(), threading.Event()
    runner = web.AppRunner(app)

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        state.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started.wait(10)
    yield state
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_queue_uploads_runs_reports_progress_and_downloads(comfyui, tmp_path):
    photo, ref = tmp_path / "photo.jpg", tmp_path / "ref.jpg"
    photo.write_bytes(b"photo bytes")
    ref.write_bytes(b"ref bytes")
    (tmp_path / "photo_restored.png").write_bytes(b"the user's earlier result")
    events = []
    workflow = API[-1]
    paths, texts = queue_restore(comfyui.url, workflow, photo, [ref], tmp_path, events.append)

    (session, _, photo_bytes), (ref_folder, _, ref_bytes) = comfyui.uploads
    assert photo_bytes == b"photo bytes" and ref_bytes == b"ref bytes" and ref_folder == f"{session}/references"
    expected = fill_workflow(json.loads(workflow.read_text()), f"{session}/photo.jpg", f"{session}/references")
    assert comfyui.prompts == [expected]
    assert [e["data"]["value"] for e in events if e["type"] == "progress"] == [1, 2, 3]
    assert paths == [tmp_path / "photo_restored_1.png"] and paths[0].read_bytes() == comfyui.result
    assert (tmp_path / "photo_restored.png").read_bytes() == b"the user's earlier result"
    assert texts == ["image 0: face 0: 0.712 (same)"]


def test_queue_reports_the_servers_execution_error(comfyui, tmp_path, capsys):
    comfyui.error = {"node_id": "7", "node_type": "RefFaceRestorePhoto", "exception_message": "no face found\n"}
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"photo bytes")
    args = ["comfy-queue", "--server", comfyui.url, "--workflow", str(API[0]), "--input", str(photo)]
    assert main([*args, "--ref", str(photo), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "refface: error: ComfyUI failed in node 7 (RefFaceRestorePhoto): no face found" in err
    assert not list(tmp_path.glob("*_restored*"))
