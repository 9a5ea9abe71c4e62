"""`refface comfy-queue`: restore photos through a running ComfyUI server (upload, queue, progress, download)."""

from __future__ import annotations

import copy
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import RefFaceError, listing

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

    def upload(self, path: Path, subfolder: str, name: str | None = None) -> str:
        """Upload an image into ComfyUI's input folder (as ``name``, default its own); returns the name LoadImage
        knows it by. Without overwrite the server keeps an identical file of that name untouched (its mtime too, so
        caches keyed on it stay valid) and saves a different one as "name (1).ext"."""
        with open(path, "rb") as f:
            data = {"subfolder": subfolder, "type": "input"}
            files = {"image": (name or path.name, f)}
            answer = self._request("POST", "/upload/image", files=files, data=data).json()
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def run(self, workflow: dict[str, Any], progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Queue ``workflow``, report each websocket event of it to ``progress``, and return its history entry."""
        import websocket

        ws_url = self.server.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        try:
            ws = websocket.create_connection(ws_url, timeout=self.timeout)
        except (OSError, websocket.WebSocketException) as e:
            raise RefFaceError(f"cannot open ComfyUI's websocket {ws_url}: {e}") from None
        prompt_id = None
        try:
            answer = self._request("POST", "/prompt", json={"prompt": workflow, "client_id": self.client_id})
            prompt_id = answer.json()["prompt_id"]
            ws.settimeout(None)  # a restore may run for minutes between events
            while True:
                try:
                    message = ws.recv()
                    if message == "":  # a close frame (ComfyUI never sends empty messages)
                        raise websocket.WebSocketConnectionClosedException("the server closed the websocket")
                except (OSError, websocket.WebSocketException) as e:
                    raise RefFaceError(
                        f"lost the connection to ComfyUI's websocket during prompt {prompt_id} ({e}); the run may "
                        f"still finish on the server: its history is at {self.server}/history/{prompt_id}"
                    ) from None
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
            if prompt_id is not None:
                self.cancel(prompt_id)
            raise
        finally:
            ws.close()
        for _ in range(100):  # the server files the history entry just after its last event
            if history := self._request("GET", f"/history/{prompt_id}").json().get(prompt_id):
                return history
            time.sleep(0.1)
        raise RefFaceError(f"ComfyUI ran the workflow but has no history for it (prompt {prompt_id})")

    def cancel(self, prompt_id: str) -> None:
        """Best effort: drop ``prompt_id`` from the queue and stop it if it runs, never touching others' prompts.
        Errors are ignored so that the caller's KeyboardInterrupt is what the user sees."""
        import requests

        # Delete first: a prompt that starts running in between is then still caught by the interrupt.
        for path, body in [("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})]:
            try:
                requests.post(self.server + path, json=body, timeout=5)
            except Exception:
                pass

    def download(self, image: dict[str, str], path: Path) -> Path:
        """Save an output image as ``path`` or the next free name; returns where it went."""
        params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": image["type"]}
        return write_new(path, self._request("GET", "/view", params=params).content)


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
    photo_name = client.upload(photo, "refface/inputs")
    # The same references always land in the same folder with the same files and mtimes, so ComfyUI's cache of
    # Load Reference Faces (keyed on the folder's names and mtimes) hits, and repeated runs add no uploads.
    names = [f"{k:02d}_{ref.name}" for k, ref in enumerate(references)]  # a/1.jpg and b/1.jpg stay two files
    folder = reference_folder(references, names)
    for ref, name in zip(references, names, strict=True):
        if client.upload(ref, folder, name) != f"{folder}/{name}":  # renamed: the folder holds another file
            raise RefFaceError(f"ComfyUI's input folder {folder} holds a different {name}; delete that folder")
    history = client.run(fill_workflow(workflow, photo_name, folder), progress)
    outputs = history.get("outputs", {}).values()
    images = [image for output in outputs for image in output.get("images", []) if image.get("type") == "output"]
    texts = [text for output in outputs for text in output.get("text", [])]
    # Each path is picked as its image is written, so the images of a batch (or of several savers) never collide.
    paths = [client.download(image, out / f"{photo.stem}_restored{Path(image['filename']).suffix}") for image in images]
    return paths, texts


def reference_folder(references: list[Path], names: list[str]) -> str:
    """``refface/refs-<hash>``: named by the references' upload names and contents, in order."""
    digest = hashlib.sha256()
    for ref, name in zip(references, names, strict=True):
        # Names count too: the same bytes under another name would otherwise add a duplicate to the folder.
        digest.update(name.encode() + b"\0" + hashlib.sha256(ref.read_bytes()).digest())
    return f"refface/refs-{digest.hexdigest()[:12]}"


def write_new(path: Path, content: bytes) -> Path:
    """Write ``content`` to ``path``, or ``name_1.ext``, ``name_2.ext``, ... if taken; returns the path used.
    The file is created exclusively, so no existing file is ever replaced, not even one made a moment ago."""
    k = 0
    while True:
        candidate = path if k == 0 else path.with_stem(f"{path.stem}_{k}")
        try:
            f = open(candidate, "xb")
        except FileExistsError:
            k += 1
            continue
        try:
            with f:
                f.write(content)
        except BaseException:
            candidate.unlink(missing_ok=True)  # ours and half-written
            raise
        return candidate
