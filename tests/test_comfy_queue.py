"""`refface comfy-queue`: filling API workflows, ComfyUI's error answers, and the whole exchange with a stand-in
server on 127.0.0.1 that speaks ComfyUI's API (upload, /prompt, websocket events, /history, /view)."""

import asyncio
import json
import os
import re
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from refface_core import RefFaceError
from refface_core.cli import main
from refface_core.comfy_queue import (
    INPUT_TITLE,
    fill_workflow,
    prompt_errors,
    queue_restore,
    reference_folder,
    write_new,
)

ALL_API = sorted((Path(__file__).resolve().parents[1] / "workflows" / "api").glob("*.json"))
API = [p for p in ALL_API if f'"{INPUT_TITLE}"' in p.read_text()]  # what comfy-queue fills: a photo and references


@pytest.mark.parametrize("path", [p for p in ALL_API if p not in API], ids=lambda p: p.stem)
def test_the_album_and_video_workflows_are_refused_in_one_line(path):
    assert len(API) == 3
    with pytest.raises(RefFaceError, match=f"needs a LoadImage node titled '{INPUT_TITLE}'"):
        fill_workflow(json.loads(path.read_text()), "refface/abc/photo.jpg", "refface/abc/references")


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


def test_write_new_never_overwrites(tmp_path):
    (tmp_path / "photo_restored.png").write_bytes(b"mine")
    (tmp_path / "photo_restored_1.png").write_bytes(b"mine too")
    assert write_new(tmp_path / "photo_restored.png", b"new") == tmp_path / "photo_restored_2.png"
    assert write_new(tmp_path / "photo_restored.png", b"newer") == tmp_path / "photo_restored_3.png"
    assert (tmp_path / "photo_restored.png").read_bytes() == b"mine"
    assert (tmp_path / "photo_restored_1.png").read_bytes() == b"mine too"
    assert (tmp_path / "photo_restored_2.png").read_bytes() == b"new"


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
    """A stand-in ComfyUI: stores uploads (renaming as ComfyUI does without overwrite) and prompts, then plays a
    run's websocket events (or an error, or a dropped connection); records targeted interrupts and queue deletes."""
    web = pytest.importorskip("aiohttp.web")
    state = SimpleNamespace(uploads=[], files={}, prompts=[], sockets=[], cancels=[], cancel_status=200)
    state.error, state.drop = None, None
    state.results = {"refface_00001_.png": b"\x89PNG result"}
    state.outputs = {
        "8": {"images": [{"filename": "refface_00001_.png", "subfolder": "refface", "type": "output"}]},
        "9": {"text": ["image 0: face 0: 0.712 (same)"]},
        "10": {"images": [{"filename": "preview.png", "subfolder": "", "type": "temp"}]},
    }

    async def upload(request):
        form = await request.post()
        subfolder, name, data = form["subfolder"], form["image"].filename, form["image"].file.read()
        state.uploads.append((subfolder, name, data, form.get("overwrite")))
        stem, ext, k = *os.path.splitext(name), 0
        while state.files.get((subfolder, name), data) != data:  # same name, other bytes: "name (1).ext"
            k += 1
            name = f"{stem} ({k}){ext}"
        state.files[subfolder, name] = data
        return web.json_response({"name": name, "subfolder": subfolder, "type": "input"})

    async def websocket(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        state.sockets.append((ws, request))
        async for _ in ws:
            pass
        return ws

    async def prompt(request):
        body = await request.json()
        state.prompts.append(body["prompt"])
        asyncio.get_running_loop().create_task(play(*state.sockets[-1]))
        return web.json_response({"prompt_id": "p1", "number": 0, "node_errors": {}})

    async def play(ws, request):
        try:
            await ws.send_json({"type": "status", "data": {"status": {}}})  # not about the prompt: ignored
            for step in (1, 2, 3):
                event = {"type": "progress", "data": {"value": step, "max": 3, "prompt_id": "p1", "node": "7"}}
                await ws.send_json(event)
                await ws.send_bytes(b"preview")
                if state.drop == "close":
                    return await ws.close()
                if state.drop == "abort":
                    return request.transport.abort()
            if state.error:
                await ws.send_json({"type": "execution_error", "data": {"prompt_id": "p1", **state.error}})
            else:
                await ws.send_json({"type": "executing", "data": {"node": None, "prompt_id": "p1"}})
        except ConnectionResetError:  # the client left (Ctrl-C)
            pass

    async def cancel(request):
        state.cancels.append((request.path, await request.json()))
        return web.Response(status=state.cancel_status)

    async def history(request):
        return web.json_response({"p1": {"outputs": state.outputs, "status": {"status_str": "success"}}})

    async def view(request):
        query = dict(request.query)
        assert query.pop("subfolder") == "refface" and query.pop("type") == "output"
        return web.Response(body=state.results[query["filename"]])

    app = web.Application()
    app.add_routes([
        web.post("/upload/image", upload), web.get("/ws", websocket), web.post("/prompt", prompt),
        web.get("/history/{prompt_id}", history), web.get("/view", view),
        web.post("/interrupt", cancel), web.post("/queue", cancel),
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

    (inputs, _, photo_bytes, _), (folder, ref_name, ref_bytes, _) = comfyui.uploads
    assert inputs == "refface/inputs" and photo_bytes == b"photo bytes"
    assert re.fullmatch("refface/refs-[0-9a-f]{12}", folder) and ref_name == "00_ref.jpg" and ref_bytes == b"ref bytes"
    assert all(overwrite is None for *_, overwrite in comfyui.uploads)  # identical files are reused as they are
    expected = fill_workflow(json.loads(workflow.read_text()), "refface/inputs/photo.jpg", folder)
    assert comfyui.prompts == [expected]
    assert [e["data"]["value"] for e in events if e["type"] == "progress"] == [1, 2, 3]
    assert paths == [tmp_path / "photo_restored_1.png"] and paths[0].read_bytes() == b"\x89PNG result"
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


def photos(tmp_path, **files):
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    return [tmp_path / name for name in files]


def test_each_output_image_gets_its_own_file(comfyui, tmp_path):
    photo, ref = photos(tmp_path, **{"photo.jpg": b"photo", "ref.jpg": b"ref"})
    (tmp_path / "photo_restored.png").write_bytes(b"the user's earlier result")
    batch = [{"filename": f"refface_0000{k}_.png", "subfolder": "refface", "type": "output"} for k in (1, 2)]
    comfyui.outputs["8"]["images"] = batch  # a batch of two
    comfyui.outputs["11"] = {"images": [{"filename": "other_00001_.png", "subfolder": "refface", "type": "output"}]}
    comfyui.results = {"refface_00001_.png": b"first", "refface_00002_.png": b"second", "other_00001_.png": b"third"}
    paths, _ = queue_restore(comfyui.url, API[-1], photo, [ref], tmp_path, lambda event: None)
    assert [p.name for p in paths] == ["photo_restored_1.png", "photo_restored_2.png", "photo_restored_3.png"]
    assert [p.read_bytes() for p in paths] == [b"first", b"second", b"third"]
    assert (tmp_path / "photo_restored.png").read_bytes() == b"the user's earlier result"


def test_references_with_the_same_name_stay_distinct(comfyui, tmp_path):
    photo, *refs = photos(tmp_path, **{"photo.jpg": b"photo", "a/1.jpg": b"one", "b/1.jpg": b"another"})
    queue_restore(comfyui.url, API[-1], photo, refs, tmp_path, lambda event: None)
    folder = reference_folder(refs, ["00_1.jpg", "01_1.jpg"])
    assert {k: v for k, v in comfyui.files.items() if k[0] == folder} == {
        (folder, "00_1.jpg"): b"one",
        (folder, "01_1.jpg"): b"another",
    }


def test_the_same_references_reuse_one_folder(comfyui, tmp_path):
    photo, ref, other = photos(tmp_path, **{"photo.jpg": b"photo", "ref.jpg": b"ref", "other.jpg": b"other"})

    def folders():
        loaders = [n for p in comfyui.prompts for n in p.values() if n["class_type"] == "RefFaceLoadReferences"]
        return [n["inputs"]["folder"] for n in loaders]

    for refs in ([ref], [ref], [other]):
        queue_restore(comfyui.url, API[-1], photo, refs, tmp_path, lambda event: None)
    first, second, third = folders()
    assert first == second != third and {first, third} == {f for f, _ in comfyui.files} - {"refface/inputs"}
    assert len(comfyui.files) == 3  # the photo and the reference were stored once
    photo.write_bytes(b"another photo of the same name")  # uses the name the server gives it
    queue_restore(comfyui.url, API[-1], photo, [ref], tmp_path, lambda event: None)
    (image,) = [n["inputs"]["image"] for n in comfyui.prompts[-1].values() if n["class_type"] == "LoadImage"]
    assert image == "refface/inputs/photo (1).jpg"


def test_a_reference_folder_holding_another_file_is_an_error(comfyui, tmp_path):
    photo, ref = photos(tmp_path, **{"photo.jpg": b"photo", "ref.jpg": b"ref"})
    folder = reference_folder([ref], ["00_ref.jpg"])
    comfyui.files[folder, "00_ref.jpg"] = b"something else"
    with pytest.raises(RefFaceError, match=f"folder {folder} holds a different 00_ref.jpg"):
        queue_restore(comfyui.url, API[-1], photo, [ref], tmp_path, lambda event: None)
    assert not comfyui.prompts


@pytest.mark.parametrize("status", [200, 500])
def test_ctrl_c_cancels_only_this_prompt(comfyui, tmp_path, status):
    comfyui.cancel_status = status  # a failing cancel still ends in the KeyboardInterrupt
    photo, ref = photos(tmp_path, **{"photo.jpg": b"photo", "ref.jpg": b"ref"})

    def ctrl_c(event):
        if event["type"] == "progress":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        queue_restore(comfyui.url, API[-1], photo, [ref], tmp_path, ctrl_c)
    assert comfyui.cancels == [("/queue", {"delete": ["p1"]}), ("/interrupt", {"prompt_id": "p1"})]
    assert not list(tmp_path.glob("*_restored*"))


@pytest.mark.parametrize("drop", ["close", "abort"])
def test_a_dropped_websocket_is_explained(comfyui, tmp_path, drop):
    comfyui.drop = drop
    photo, ref = photos(tmp_path, **{"photo.jpg": b"photo", "ref.jpg": b"ref"})
    message = "lost the connection to ComfyUI's websocket during prompt p1 .*history is at http://.*/history/p1"
    with pytest.raises(RefFaceError, match=message):
        queue_restore(comfyui.url, API[-1], photo, [ref], tmp_path, lambda event: None)
