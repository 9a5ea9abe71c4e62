"""End to end: a real ComfyUI server with this pack and tiny random models, driven through its HTTP/websocket API
(`refface comfy-queue`'s client) and a headless Chromium. Runs when COMFYUI_DIR points at a ComfyUI checkout
(COMFYUI_PYTHON: the Python that runs it, default this one); skipped otherwise."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from support import tiny_restorer

from refface_core import RefFaceError
from refface_core.cli import main
from refface_core.comfy_queue import ComfyClient, fill_workflow, queue_restore

REPO = Path(__file__).resolve().parents[2]
FACES = REPO / "tests" / "data" / "faces"
API = sorted((REPO / "workflows" / "api").glob("*.json"))
EDITOR = sorted((REPO / "workflows").glob("*.json"))
NODE_IDS = {
    "RefFaceLoadModel", "RefFaceLoadFaceAnalysis", "RefFaceLoadFaRL", "RefFaceLoadReferences",
    "RefFaceIdentityEmbedding", "RefFaceBuildContext", "RefFaceCropFaces", "RefFaceRestore", "RefFacePasteFaces",
    "RefFaceRestorePhoto", "RefFaceIdentitySimilarity", "RefFaceGroupPeople", "RefFaceRestoreAlbum",
    "RefFaceRestoreVideo",
}  # fmt: skip
# each template's photo and references, when queued through `refface comfy-queue` (uploaded, not the examples)
SINGLE = "Restore a face from one reference"
ALBUM = "Restore a face from several references"
GROUP = "Restore one person in a group photo"
CASES = {
    SINGLE: ("macron_2.jpg", ["macron_1.jpg"]),
    ALBUM: ("macron_2.jpg", ["macron_1.jpg", "obama.jpg", "macron_2.jpg"]),
    GROUP: ("group.jpg", ["macron_1.jpg"]),
}
PHOTO_API = [p for p in API if p.stem in CASES]  # one photo in, one out; the album and video templates have their own

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR, reason="end-to-end: set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON to its Python)"
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for name in ("macron_1.jpg", "macron_2.jpg", "obama.jpg"):
        shutil.copy(FACES / name, folder / name)
    left, right = (Image.open(FACES / n).convert("RGB").resize((400, 500)) for n in ("macron_2.jpg", "ardern_1.jpg"))
    group = Image.new("RGB", (800, 500))
    group.paste(left, (0, 0))
    group.paste(right, (400, 0))
    group.save(folder / "group.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("comfyui")


@pytest.fixture(scope="module")
def server(base):
    """ComfyUI on a free 127.0.0.1 port, in its own base folder as on a fresh install: this pack, a tiny model as
    models/refface/refldm, an empty input folder (the pack puts its example photos there)."""
    for folder in ("custom_nodes", "user", "input"):
        (base / folder).mkdir()
    (base / "custom_nodes" / "refface").symlink_to(REPO)
    tiny_restorer(seed=6).save_pretrained(base / "models" / "refface" / "refldm")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    command = [
        python, str(Path(COMFYUI_DIR) / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", str(base), "--user-directory", str(base / "user"), "--database-url", "sqlite:///:memory:",
    ]  # fmt: skip
    log = open(base / "server.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=COMFYUI_DIR)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    while True:
        try:
            if requests.get(url + "/object_info/RefFaceRestore", timeout=5).ok:
                break
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() - started > 180:
            process.kill()
            pytest.fail(f"ComfyUI did not start; its log:\n{(base / 'server.log').read_text()[-4000:]}")
        time.sleep(0.5)
    print(f"ComfyUI ready in {time.monotonic() - started:.1f} s at {url}")
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()
    assert "IMPORT FAILED" not in (base / "server.log").read_text()


def test_object_info_lists_every_node_and_the_templates_have_names_and_thumbnails(server):
    info = requests.get(server + "/object_info", timeout=30).json()
    assert NODE_IDS <= set(info)
    assert info["RefFaceLoadModel"]["input"]["required"]["model_name"][1]["options"] == ["refldm"]
    templates = requests.get(server + "/api/workflow_templates", timeout=30).json()
    assert sorted(templates["refface"]) == [p.stem for p in EDITOR]  # the card titles
    for name in templates["refface"]:  # what a template card fetches: its thumbnail, then the workflow
        thumbnail = requests.get(f"{server}/api/workflow_templates/refface/{name}.jpg", timeout=30)
        assert thumbnail.status_code == 200 and thumbnail.headers["Content-Type"] == "image/jpeg", name
        assert Image.open(io.BytesIO(thumbnail.content)).size == (256, 256)
        workflow = requests.get(f"{server}/api/workflow_templates/refface/{name}.json", timeout=30)
        assert workflow.status_code == 200 and workflow.json()["nodes"], name


@pytest.mark.parametrize("workflow", PHOTO_API, ids=[p.stem for p in PHOTO_API])
def test_every_template_runs_as_shipped_on_the_photos_the_pack_installed(server, base, workflow):
    graph = json.loads(workflow.read_text())
    loads = {n["_meta"]["title"]: n["inputs"]["image"] for n in graph.values() if n["class_type"] == "LoadImage"}
    assert loads and all((base / "input" / name).is_file() for name in loads.values())  # only the pack put them there
    history = ComfyClient(server).run(graph, lambda event: None)
    assert history["status"]["status_str"] == "success"
    (saved,) = [i for o in history["outputs"].values() for i in o.get("images", []) if i["type"] == "output"]
    restored = Image.open(base / "output" / saved["subfolder"] / saved["filename"])
    assert restored.size == Image.open(base / "input" / loads["Input photo"]).size


@pytest.mark.parametrize("workflow", PHOTO_API, ids=[p.stem for p in PHOTO_API])
def test_every_api_workflow_restores_with_websocket_progress(server, photos, tmp_path, workflow):
    photo, refs = CASES[workflow.stem]
    events = []
    paths, texts = queue_restore(server, workflow, photos / photo, [photos / r for r in refs], tmp_path, events.append)
    progress = [e["data"] for e in events if e["type"] == "progress"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 50  # one tick per sampling step
    assert [p.name for p in paths] == [f"{Path(photo).stem}_restored.png"]
    before, after = np.asarray(Image.open(photos / photo)), np.asarray(Image.open(paths[0]))
    assert after.shape == before.shape
    assert np.abs(after.astype(int) - before).mean() > 0.1  # the face changed
    assert any(t.startswith("image 0:") for t in texts)  # the faces and similarity reports
    assert any(t.startswith("00_") for t in texts)  # Load Reference Faces' report on the references


def test_album_template_restores_each_persons_degraded_faces_in_the_example_album(server, base):
    graph = json.loads((REPO / "workflows" / "api" / "Restore everyone in an album.json").read_text())
    album = base / "input" / graph["3"]["inputs"]["folder"]
    history = ComfyClient(server).run(graph, lambda event: None)
    assert history["status"]["status_str"] == "success"
    report = history["outputs"]["3"]["text"]
    assert any(line.startswith("person_1: ") and "refface_old_photo_macron.jpg#0" in line for line in report), report
    saved = [i for i in history["outputs"]["6"]["images"] if i["type"] == "output"]
    photos = sorted(album.iterdir())
    assert len(saved) == len(photos) == 5
    for photo, image in zip(photos, saved, strict=True):  # every photo, in the album's order, at its size
        assert Image.open(base / "output" / image["subfolder"] / image["filename"]).size == Image.open(photo).size
    restored = {line.split(":")[0] for line in history["outputs"]["5"]["text"] if "restored 0 face" not in line}
    assert "refface_old_photo_macron.jpg" in restored  # the worn photo of Macron, with his own references
    (sheet,) = history["outputs"]["4"]["images"]  # the people preview
    assert sheet["type"] == "temp"


def test_video_template_keeps_the_frames_rate_and_audio_of_the_example_video(server, base):
    import av

    graph = json.loads((REPO / "workflows" / "api" / "Restore a face through a video.json").read_text())
    source = base / "input" / graph["7"]["inputs"]["file"]
    history = ComfyClient(server).run(graph, lambda event: None)
    assert history["status"]["status_str"] == "success"
    report = history["outputs"]["9"]["text"]
    assert any(line.startswith("track 0: 18 frames restored; flicker ") for line in report), report
    (video,) = [v for v in history["outputs"]["11"]["images"] if v["type"] == "output"]
    output = base / "output" / video["subfolder"] / video["filename"]
    with av.open(str(source)) as before, av.open(str(output)) as after:
        v_in, v_out = before.streams.video[0], after.streams.video[0]
        assert (v_out.width, v_out.height) == (v_in.width, v_in.height) and v_out.average_rate == v_in.average_rate
        assert len(after.streams.audio) == len(before.streams.audio) == 1
        assert sum(1 for _ in after.decode(video=0)) == 18


def test_interrupt_mid_run_then_the_next_run_works(server, photos):
    client = ComfyClient(server)
    workflow = json.loads((REPO / "workflows" / "api" / f"{SINGLE}.json").read_text())
    for node in workflow.values():
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = 1000
    photo = client.upload(photos / "macron_2.jpg", "e2e")
    client.upload(photos / "macron_1.jpg", "e2e/references")
    filled = fill_workflow(workflow, photo, "e2e/references")

    def interrupt_at_first_step(event):
        if event["type"] == "progress":
            requests.post(server + "/interrupt", timeout=10)

    with pytest.raises(RefFaceError, match="interrupted"):
        client.run(filled, interrupt_at_first_step)
    for node in filled.values():
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = 5
    assert client.run(filled, lambda event: None)["status"]["status_str"] == "success"


def test_cli_comfy_queue_and_a_clear_error_from_the_server(server, photos, tmp_path, capsys):
    group = REPO / "workflows" / "api" / f"{GROUP}.json"
    args = ["comfy-queue", "--server", server, "--workflow", str(group), "--input", str(photos / "group.jpg")]
    assert main([*args, "--ref", str(photos / "macron_1.jpg"), "--out", str(tmp_path)]) == 0
    assert f"wrote {tmp_path / 'group_restored.png'}" in capsys.readouterr().out
    assert main([*args, "--ref", str(photos / "obama.jpg"), "--out", str(tmp_path)]) == 1  # Obama is not in it
    assert "no face clearly matches the references" in capsys.readouterr().err


def test_editor_workflows_load_in_headless_chromium(server, tmp_path):
    script = REPO / "tests" / "e2e" / "load_workflows.mjs"
    if shutil.which("node") is None or not (script.parent / "node_modules" / "playwright-core").is_dir():
        pytest.skip("needs node and `npm ci` in tests/e2e (playwright-core), plus Debian's chromium")
    out = Path(os.environ.get("REFFACE_E2E_SCREENSHOTS", tmp_path))
    # the one-reference template with a reference of another person, as a user might pick by mistake
    one = json.loads(next(p for p in EDITOR if "one reference" in p.stem).read_text())
    for node in one["nodes"]:
        if node["type"] == "LoadImage" and "reference" in node["widgets_values"][0]:
            node["widgets_values"][0] = "refface_reference_obama.jpg"
    wrong = tmp_path / "Wrong person as the reference.json"
    wrong.write_text(json.dumps(one))
    result = subprocess.run(
        ["node", str(script), "--server", server, "--out", str(out), "--run", *map(str, [*EDITOR, wrong])],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["workflow"] for r in reports] == [p.stem for p in [*EDITOR, wrong]], result.stderr[-3000:]
    warned = [r for r in reports[-1]["reports"] if "may not be the person in the references" in r["text"]]
    assert reports[-1]["run"]["outcome"] == "success" and warned and warned[0]["warnings"] >= 1, reports[-1]
    for report, editor in zip(reports, EDITOR, strict=False):
        assert report["ok"] and report["missing"] == [], report
        assert Path(report["screenshot"]).stat().st_size > 10_000
        api = json.loads((REPO / "workflows" / "api" / editor.name).read_text())
        queued = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in report["prompt"].items()}
        for node in queued.values():  # Load Video's preview, a widget of the frontend's own that the server ignores
            node["inputs"].pop("video-preview", None)
        assert queued == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
        assert report["combo_missing"] == [], report["combo_missing"]  # the frontend would flag a missing input
        shown = {v["filename"] for v in report["views"] if v["status"] == 200 and v.get("type") == "input"}
        assert {n["inputs"]["image"] for n in api.values() if n["class_type"] == "LoadImage"} <= shown, report["views"]
        assert report["run"]["outcome"] == "success" and report["reports"], report  # run as Run does; reports shown
    album = next(r for r in reports if "several references" in r["workflow"])
    flagged = [r for r in album["reports"] if "FLAGGED" in r["text"]]
    assert flagged and flagged[0]["warnings"] >= 1 and "⚠" in flagged[0]["text"]  # Obama's photo, marked
    print("screenshots:", *(r["screenshot"] for r in reports), *(r["run_screenshot"] for r in reports))
