"""`refface comfy-queue`: restore photos through a running ComfyUI server (upload, queue, progress, download)."""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import RefFaceError, listing
from .files import write_atomic

INPUT_TITLE = "Input photo"  # the API workflow's LoadImage node that gets the photo
REFERENCES_NODE = "RefFaceLoadReferences"


def fill_workflow(workflow: dict[str, Any], photo: str, reference_folder: str) -> dict[str, Any]:
    """A copy of an API-format ``workflow`` that restores ``photo`` with the references in ``reference_folder``
    (both as ComfyUI's input folder names them): the reference image inputs give way to the folder."""
    graph = copy.deepcopy(workflow)
    inputs = [
        n
        for n in graph.values()
        if n.get("class_type") == "LoadImage" and n.get("_meta", {}).get("title") == INPUT_TITLE
    ]
    loaders = [n for n in graph.values() if n.get("class_type") == REFERENCES_NODE]
    if not inputs or not loaders:
        raise RefFaceError(
            f"the workflow needs a LoadImage node titled {INPUT_TITLE!r} and a {REFERENCES_NODE} node "
            "(see workflows/api/ for examples)"
        )
    for node in inputs:
        node["inputs"]["image"] = photo
    unlinked = set()
    for node in loaders:
        for name in [k for k in node["inputs"] if k.startswith("references.")]:
            unlinked.add(node["inputs"].pop(name)[0])
        node["inputs"]["folder"] = reference_folder
    still_used = {v[0] for n in graph.values() for v in n["inputs"].values() if isinstance(v, list) and len(v) == 2}
    for node_id in unlinked - still_used:
        if graph[node_id].get("class_type") == "LoadImage":
            del graph[node_id]
    return graph


class ComfyClient:
    """The parts of ComfyUI's HTTP and websocket API that queueing a restore needs."""

    def __init__(self, server: str, timeout: float = 60) -> None:
        self.server, self.timeout, self.client_id = server.rstrip("/"), timeout, uuid.uuid4().hex

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import requests

        try:
            response = requests.request(method, self.server + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as e:
            raise RefFaceError(f"cannot reach ComfyUI at {self.server}: {e}; is the server running?") from None
        if response.status_code == 400 and path == "/prompt":
            raise RefFaceError(prompt_errors(response.json()))
        if not response.ok:
            raise RefFaceError(f"ComfyUI answered {response.status_code} to {method} {path}: {response.text[:500]}")
        return response

    def upload(self, path: Path, subfolder: str) -> str:
        """Upload an image into ComfyUI's input folder; returns the name LoadImage knows it by."""
        with open(path, "rb") as f:
            data = {"subfolder": subfolder, "type": "input", "overwrite": "true"}
            answer = self._request("POST", "/upload/image", files={"image": (path.name, f)}, data=data).json()
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def run(self, workflow: dict[str, Any], progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Queue ``workflow``, report each websocket event of it to ``progress``, and return its history entry."""
        import websocket

        ws_url = self.server.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        try:
            ws = websocket.create_connection(ws_url, timeout=self.timeout)
        except (OSError, websocket.WebSocketException) as e:
            raise RefFaceError(f"cannot open ComfyUI's websocket {ws_url}: {e}") from None
        try:
            answer = self._request("POST", "/prompt", json={"prompt": workflow, "client_id": self.client_id})
            prompt_id = answer.json()["prompt_id"]
            ws.settimeout(None)  # a restore may run for minutes between events
            while True:
                message = ws.recv()
                if isinstance(message, bytes):
                    continue  # preview images
                event = json.loads(message)
                data = event.get("data", {})
                if data.get("prompt_id") != prompt_id:
                    continue
                progress(event)
                if event["type"] == "execution_error":
                    raise RefFaceError(
                        f"ComfyUI failed in node {data.get('node_id')} ({data.get('node_type')}): "
                        f"{data.get('exception_message', '').strip()}"
                    )
                if event["type"] == "execution_interrupted":
                    raise RefFaceError("the run was interrupted on the ComfyUI server")
                if event["type"] == "executing" and data.get("node") is None or event["type"] == "execution_success":
                    break
        except KeyboardInterrupt:
            self._request("POST", "/interrupt")
            raise
        finally:
            ws.close()
        for _ in range(100):  # the server files the history entry just after its last event
            if history := self._request("GET", f"/history/{prompt_id}").json().get(prompt_id):
                return history
            time.sleep(0.1)
        raise RefFaceError(f"ComfyUI ran the workflow but has no history for it (prompt {prompt_id})")

    def download(self, image: dict[str, str], path: Path) -> Path:
        params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": image["type"]}
        content = self._request("GET", "/view", params=params).content
        write_atomic(path, lambda tmp: Path(tmp).write_bytes(content))
        return path


def prompt_errors(answer: dict[str, Any]) -> str:
    """ComfyUI's 400 answer to /prompt -> one readable message."""
    problems = [
        f"node {node_id} ({errors.get('class_type')}): {e.get('message')}: {e.get('details')}"
        for node_id, errors in answer.get("node_errors", {}).items()
        for e in errors.get("errors", [])
    ]
    error = answer.get("error", {})
    return listing(f"ComfyUI rejected the workflow: {error.get('message', 'invalid prompt')}", problems)


def queue_restore(
    server: str,
    workflow_file: Path,
    photo: Path,
    references: list[Path],
    out: Path,
    progress: Callable[[dict[str, Any]], None],
) -> tuple[list[Path], list[str]]:
    """Upload, fill ``workflow_file``, run it on ``server``; returns the downloaded images and any text outputs."""
    try:
        workflow = json.loads(workflow_file.read_text())
    except (OSError, ValueError) as e:
        raise RefFaceError(f"cannot read the workflow {workflow_file}: {e}") from None
    if "nodes" in workflow and "links" in workflow:
        raise RefFaceError(f"{workflow_file} is an editor-format workflow; use the API-format one (workflows/api/)")
    for path in [photo, *references]:
        if not path.is_file():
            raise RefFaceError(f"image not found: {path}")
    if not out.is_dir():
        raise RefFaceError(f"output folder does not exist: {out}")
    client = ComfyClient(server)
    session = f"refface/{uuid.uuid4().hex[:12]}"
    photo_name = client.upload(photo, session)
    for ref in references:
        client.upload(ref, f"{session}/references")
    history = client.run(fill_workflow(workflow, photo_name, f"{session}/references"), progress)
    outputs = history.get("outputs", {}).values()
    images = [image for output in outputs for image in output.get("images", []) if image.get("type") == "output"]
    texts = [text for output in outputs for text in output.get("text", [])]
    paths = [unused_path(out / f"{photo.stem}_restored{Path(image['filename']).suffix}") for image in images]
    return [client.download(image, path) for image, path in zip(images, paths, strict=True)], texts


def unused_path(path: Path) -> Path:
    """``path``, or ``name_1.ext``, ``name_2.ext``, ...: never overwrite the user's files."""
    k = 0
    while (candidate := path if k == 0 else path.with_stem(f"{path.stem}_{k}")).exists():
        k += 1
    return candidate
