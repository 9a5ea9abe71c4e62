"""`refface video` on a short synthetic video: a real photo moved and zoomed over the frames, degraded, stored
rotated and at irregular timestamps, with an AAC audio track. The tiny random restorer stands in for the model."""

import argparse
import json
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from support import FRAMES, SIZE, face_path, synthetic_frames, tiny_restorer

from refface_core import RefFaceError, RefFaceRestorer
from refface_core.cli import video as video_command
from refface_core.faces import Face, load_face_analysis
from refface_core.faces.analysis import FaceAnalysis
from refface_core.images import load_image
from refface_core.model import CompositeContext
from refface_core.video import (
    Parts,
    Track,
    choose_tracks,
    flicker,
    link_tracks,
    plan_tracks,
    restore_planned_frames,
    resume_settings,
    smooth_landmarks,
    split_segments,
    track_plan,
)

DATA = Path(__file__).parent / "data" / "faces"
PTS = [0, 80, 170, 250, 330, 420, 500, 580]  # ms: a variable frame rate
SAMPLE_RATE = 16000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_restorer(seed=6).save_pretrained(folder)
    return folder


# BT.709, full range, 4:3 pixels: what a camera may write, and what the default (BT.601, limited) conversion shifts
BT709_FULL = {"color_primaries": 1, "color_trc": 1, "colorspace": 1, "color_range": 2}


def write_video(path, frames, rotation=90, color=None, sample_aspect_ratio=None):
    """H.264 in MP4, stored turned (a phone held sideways) with a display matrix that turns it upright, timestamps
    in ms, and a mono AAC sine; ``color`` tags (and converts) the frames as that colorspace and range."""
    k = rotation // 90
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=12)
        video.height, video.width = np.rot90(frames[0], -k).shape[:2]
        video.pix_fmt = "yuv420p"
        video.codec_context.time_base = Fraction(1, 1000)
        video.bit_rate = 400_000
        video.set_display_rotation(rotation)
        for name, value in (color or {}).items():
            setattr(video.codec_context, name, value)
        if sample_aspect_ratio:
            video.codec_context.sample_aspect_ratio = sample_aspect_ratio
        audio = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        for frame, pts in zip(frames, PTS, strict=False):
            stored = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(frame, -k)), format="rgb24")
            if color:
                stored = stored.reformat(
                    format="yuv420p", src_colorspace=color["colorspace"], dst_colorspace=color["colorspace"],
                    src_color_range="JPEG", dst_color_range=color["color_range"],
                )  # fmt: skip
                for name, value in color.items():
                    setattr(stored, name, value)
            stored.pts, stored.time_base = pts, Fraction(1, 1000)
            container.mux(video.encode(stored))
        container.mux(video.encode())
        seconds = np.arange(int(0.7 * SAMPLE_RATE)) / SAMPLE_RATE
        samples = (0.3 * np.sin(2 * np.pi * 440 * seconds)).astype(np.float32)[None]
        for start in range(0, samples.shape[1], 1024):
            chunk = av.AudioFrame.from_ndarray(samples[:, start : start + 1024], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = SAMPLE_RATE, start
            container.mux(audio.encode(chunk))
        container.mux(audio.encode())
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", synthetic_frames())


def read(path):
    """Upright frames with their timestamps (s), the video stream's properties and the audio packets."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames, times, rotations = [], [], set()
        for frame in container.decode(stream):
            rotations.add(frame.rotation)
            frames.append(np.rot90(frame.to_ndarray(format="rgb24"), frame.rotation // 90))
            times.append(float(frame.pts * frame.time_base))
        props = (stream.codec_context.name, stream.width, stream.height, stream.average_rate, rotations)
    with av.open(str(path)) as container:
        audio = container.streams.audio[0]
        packets = [(p.pts, bytes(p)) for p in container.demux(audio) if p.dts is not None]
        props += (audio.codec_context.name, audio.sample_rate)
    return frames, times, props, packets


def run_video(model_dir, clip, out, *extra):
    parser = argparse.ArgumentParser()
    video_command.add_to(parser.add_subparsers())
    args = ["video", str(clip), "--ref", str(DATA / "macron_2.jpg"), "--out", str(out), "--model", str(model_dir)]
    args = parser.parse_args([*args, "--steps", "2", "--dtype", "fp32", *extra])
    return args.run(args)


@pytest.fixture
def jittery_detector(monkeypatch):
    """Landmarks with ~3 px of noise, seeded by the frame's pixels, as a real detector's wobble on video: both runs
    of the flicker test see the same noise."""
    detect = FaceAnalysis.detect

    def jittered(self, image):
        faces = detect(self, image)
        rng = np.random.default_rng(zlib.crc32(image.tobytes()))
        for face in faces:
            face.landmarks = face.landmarks + rng.normal(0, 3.0, 2)
        return faces

    monkeypatch.setattr(FaceAnalysis, "detect", jittered)


@pytest.fixture(scope="module")
def resumed(model_dir, clip, tmp_path_factory):
    """A run stopped after 4 restored frames, then run again: the frames each run restored, and the output."""
    from refface_core.video import Parts

    out = tmp_path_factory.mktemp("resumed") / "out.mp4"
    counts = []
    restore_batch, save = RefFaceRestorer.restore_batch, Parts.save

    def counted(self, faces, *args, **kwargs):
        counts[-1] += len(faces)
        return restore_batch(self, faces, *args, **kwargs)

    def interrupted(self, track, frame, crop):
        if counts[-1] > 4:
            raise KeyboardInterrupt
        save(self, track, frame, crop)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RefFaceRestorer, "restore_batch", counted)
        patch.setattr(Parts, "save", interrupted)
        counts.append(0)
        with pytest.raises(KeyboardInterrupt):
            run_video(model_dir, clip, out, "--batch-size", "4")
        parts = sorted(p.name for p in (out.parent / "out.mp4.parts").glob("*.png"))
        assert not out.exists()
        patch.setattr(Parts, "save", save)
        counts.append(0)
        assert run_video(model_dir, clip, out, "--batch-size", "4") == 0
    return counts, parts, out


def test_resumes_from_the_restored_parts(resumed):
    counts, parts, out = resumed
    assert len(parts) == 4 and counts == [8, FRAMES - 4]  # the second batch was stopped; only it is restored again
    assert out.exists() and not (out.parent / "out.mp4.parts").exists()


def test_round_trip_keeps_timing_size_rotation_codec_and_audio(resumed, clip):
    out = resumed[2]
    before, times_in, props_in, audio_in = read(clip)
    after, times_out, props_out, audio_out = read(out)
    assert len(after) == len(before) == FRAMES
    assert times_out == pytest.approx(times_in, abs=1e-6) == [p / 1000 for p in PTS]
    assert props_out == props_in
    assert props_out[1:3] == (SIZE[1], SIZE[0]) and props_out[4] == {90}  # stored turned, shown upright
    assert audio_out == audio_in  # the same AAC packets, byte for byte
    report = json.loads(out.with_name("out.mp4.json").read_text())
    restored = report["restored"]["0"]
    assert restored["frames"] == FRAMES and len(restored["per_frame"]) == FRAMES
    assert restored["flicker"]["input"] > 0 and restored["flicker"]["output"] > 0
    x, y, _ = face_path(0)
    changed = np.abs(after[0].astype(int) - before[0]).mean(2)
    assert changed[y - 5 : y + 5, x - 5 : x + 5].mean() > 5  # the face was restored
    assert changed[:, -20:].mean() < 3  # away from it, only the re-encoding


def face_flicker(frames):
    """Mean |Δ| between consecutive frames over the face's true box (from the synthetic path), the same for every
    run, so the runs compare on the same pixels."""
    diffs = []
    for t in range(1, FRAMES):
        x, y, zoom = face_path(t)
        half = round(14 * zoom)
        region = np.zeros(frames[t].shape[:2], bool)
        region[y - half : y + half, x - half : x + half] = True
        diffs.append(flicker(frames[t - 1], frames[t], region))
    return float(np.mean(diffs))


def test_smoothed_landmarks_flicker_less_than_a_per_frame_restore(model_dir, clip, tmp_path, jittery_detector):
    for smooth in (9, 1):
        assert run_video(model_dir, clip, tmp_path / f"smooth{smooth}.mp4", "--smooth", str(smooth)) == 0
    smoothed, per_frame = (read(tmp_path / f"smooth{s}.mp4")[0] for s in (9, 1))
    source = read(clip)[0]
    figures = {name: face_flicker(frames) for name, frames in [("input", source), ("smoothed", smoothed),
                                                                ("per_frame", per_frame)]}  # fmt: skip
    print(f"flicker over the face box: {figures}")
    assert figures["smoothed"] < 0.97 * figures["per_frame"]  # ~0.93 here: 8 frames and a random model are noisy
    reported = {s: json.loads((tmp_path / f"smooth{s}.mp4.json").read_text())["restored"]["0"] for s in (9, 1)}
    assert reported[9]["flicker"]["output"] < reported[1]["flicker"]["output"]


def test_smoothing_keeps_steady_motion_and_removes_jitter():
    t = np.arange(20.0)[:, None, None]
    path = np.zeros((20, 5, 2)) + 3 * t + 0.1 * t**2  # accelerating: a quadratic passes the filter unchanged
    noise = np.random.default_rng(0).normal(0, 1.5, path.shape)
    assert np.allclose(smooth_landmarks(path, 9), path)
    assert np.abs(smooth_landmarks(path + noise, 9) - path).std() < 0.6 * noise.std()
    assert np.array_equal(smooth_landmarks(path[:2], 9), path[:2])  # too short to smooth


def audio_only(folder):
    with av.open(str(folder / "sound.mp4"), "w") as container:
        audio = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, 0
        container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return folder / "sound.mp4"


def no_face(folder):
    return write_video(folder / "wall.mp4", [np.full((SIZE[1], SIZE[0], 3), 128, np.uint8)] * 3, rotation=0)


def text_file(folder):
    (folder / "notes.mp4").write_text("not a video at all\n" * 50)
    return folder / "notes.mp4"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda folder: folder / "missing.mp4", "video not found"),
        (text_file, "not a readable video"),
        (audio_only, "has no video stream"),
        (no_face, "no face found in any frame"),
    ],
)
def test_bad_input_is_one_clear_error(model_dir, tmp_path, make, message, capsys):
    from refface_core import cli

    args = ["video", str(make(tmp_path)), "--ref", str(DATA / "macron_2.jpg"), "--out", str(tmp_path / "o.mp4")]
    assert cli.main([*args, "--model", str(model_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the error, and no traceback
    assert [line for line in err if "error" in line.lower()] == [err[-1]] and not any("Traceback" in x for x in err)
    assert err[-1].startswith("refface: error:") and message in err[-1]


def test_refuses_to_overwrite_and_the_input(model_dir, clip, tmp_path):
    (tmp_path / "taken.mp4").write_bytes(b"x")
    with pytest.raises(RefFaceError, match="exists; pass --overwrite"):
        run_video(model_dir, clip, tmp_path / "taken.mp4")
    with pytest.raises(RefFaceError, match="is the input video"):
        run_video(model_dir, clip, clip, "--overwrite")
    with pytest.raises(RefFaceError, match="unknown video extension"):
        run_video(model_dir, clip, tmp_path / "out.gif")


def test_restored_frames_keep_the_colours_and_tags_of_a_bt709_full_range_video(model_dir, tmp_path):
    """The restored frames go back in the input's colorspace and range: away from the face, they keep the input's
    colours as the untouched frames do; the output is tagged as the input was."""
    clip = write_video(tmp_path / "hd.mp4", synthetic_frames(), 0, BT709_FULL, Fraction(4, 3))
    out = tmp_path / "hd_out.mp4"
    assert run_video(model_dir, clip, out) == 0
    with av.open(str(out)) as container:
        codec = container.streams.video[0].codec_context
        assert {name: int(getattr(codec, name)) for name in BT709_FULL} == BT709_FULL
        assert codec.sample_aspect_ratio == Fraction(4, 3)
    before, after = read(clip)[0], read(out)[0]
    x, y, _ = face_path(0)
    for t in range(FRAMES):  # away from the face: the same colours, only the re-encoding's noise
        difference = after[t][:, -20:].astype(int) - before[t][:, -20:]
        assert np.abs(difference).mean() < 2.5
        assert np.abs(difference.mean((0, 1))).max() < 1.5  # no shift of a channel (BT.601 limited: ~3 levels)
    assert np.abs(after[0].astype(int) - before[0]).mean(2)[y - 5 : y + 5, x - 5 : x + 5].mean() > 5


def box_face(x, y, size=20.0):
    """A face with its box at (x, y) and landmarks inside it."""
    landmarks = np.array([[x + 5, y + 6], [x + 15, y + 6], [x + 10, y + 10], [x + 6, y + 15], [x + 14, y + 15]], float)
    return Face(np.array([x, y, x + size, y + size], float), landmarks, 0.9)


def test_a_track_is_split_at_a_cut_and_not_filled_or_smoothed_across_it():
    faces = [box_face(10 + t, 10) for t in range(4)] + [box_face(120 + t, 60) for t in range(4)]  # a cut after 3
    assert split_segments(faces) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_segments(faces[:1]) == [[0]] and split_segments([]) == []
    # one person seen again after a cut 2 frames later, joined on identity alone
    embedding = np.ones(4, np.float32) / 2
    detections = [([f], embedding[None], [True]) for f in faces[:4]] + [([], np.zeros((0, 4)), [])] * 2
    detections += [([f], embedding[None], [True]) for f in faces[4:]]
    (track,) = link_tracks(detections, threshold=0.5)
    assert track.frames == [0, 1, 2, 3, 6, 7, 8, 9] and len(track.segments()) == 2
    plan = track_plan(track, 5)
    assert sorted(plan) == [0, 1, 2, 3, 6, 7, 8, 9]  # no landmarks made up for frames 4 and 5, where no face is
    assert np.allclose(plan[3], faces[3].landmarks) and np.allclose(plan[6], faces[4].landmarks)  # no smearing
    assert np.allclose(track.identity(), embedding)


def test_track_identity_is_the_running_mean():
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(6, 8)).astype(np.float32)
    track = Track([0], [box_face(0, 0)], [embeddings[0]], [True])
    for t in range(1, 6):
        track.add(t, box_face(t, 0), embeddings[t], True)
    mean = embeddings.mean(0)
    assert np.allclose(track.identity(), mean / np.linalg.norm(mean), atol=1e-6)


def test_short_and_even_smoothing_windows():
    t = np.arange(12.0)[:, None, None]
    path = np.zeros((12, 5, 2)) + 2 * t
    noise = np.random.default_rng(0).normal(0, 1.5, path.shape)
    assert np.array_equal(smooth_landmarks(path + noise, 8), smooth_landmarks(path + noise, 7))  # even: one less
    three = smooth_landmarks(path + noise, 3)  # a moving mean: a line passes, jitter is reduced
    assert np.allclose(smooth_landmarks(path, 3), path)
    assert np.abs(three - path).std() < 0.8 * noise.std()
    assert np.array_equal(smooth_landmarks(path + noise, 1), path + noise)


def test_even_smooth_is_refused(model_dir, clip, tmp_path):
    with pytest.raises(RefFaceError, match="--smooth must be an odd number"):
        run_video(model_dir, clip, tmp_path / "out.mp4", "--smooth", "8")


def test_a_missing_track_is_named_as_a_track():
    tracks = [Track([0], [box_face(0, 0)], [np.ones(4, np.float32)], [True]) for _ in range(2)]
    with pytest.raises(RefFaceError, match=r"^track 9 does not exist: the video has 2 tracks \(0\.\.1\)$"):
        choose_tracks(tracks, np.ones((1, 4), np.float32), 9, 0.3, log=lambda line: None)


def test_the_report_is_not_overwritten(model_dir, clip, tmp_path):
    (tmp_path / "out.mp4.json").write_text("{}")
    with pytest.raises(RefFaceError, match="out.mp4.json .*exists; pass --overwrite"):
        run_video(model_dir, clip, tmp_path / "out.mp4")


def test_a_parts_folder_refface_did_not_make_is_refused(tmp_path):
    foreign = tmp_path / "out.mp4.parts"
    foreign.mkdir()
    (foreign / "holiday.png").write_bytes(b"mine")
    with pytest.raises(RefFaceError, match="is not RefFace's"):
        Parts(tmp_path / "out.mp4", {}).load_plan()
    assert (foreign / "holiday.png").exists()
    (foreign / "holiday.png").unlink()
    assert Parts(tmp_path / "out.mp4", {}).load_plan() is None  # empty: a run stopped before its plan; replaced
    stale = Parts(tmp_path / "out.mp4", {"a": 1})
    stale.save_plan({0: {0: np.zeros((5, 2))}}, [])
    assert Parts(tmp_path / "out.mp4", {"a": 2}).load_plan() is None and not foreign.exists()  # ours: replaced


def test_the_resume_key_covers_dtype_references_and_sampling(clip):
    from types import SimpleNamespace

    import torch

    from refface_core.model.restorer import CompositeContext

    restorer = SimpleNamespace(dtype=torch.float32, image_size=512)
    analysis = SimpleNamespace(name="faces")
    identity, context = np.ones((1, 4), np.float32), CompositeContext(torch.zeros(1, 1, 3, 4, 4))

    def key(**changes):
        given = {"restorer": restorer, "identity": identity, "context": context, "steps": 2, **changes}
        return resume_settings(given.pop("restorer"), analysis, clip, given.pop("identity"), given.pop("context"),
                               **given)  # fmt: skip

    same = key()
    assert key() == same
    assert key(restorer=SimpleNamespace(dtype=torch.float16, image_size=512)) != same
    assert key(identity=identity * 2) != same
    assert key(context=CompositeContext(torch.ones(1, 1, 3, 4, 4))) != same
    assert key(steps=3) != same


def test_previous_frame_guides_each_frame_with_the_restored_one_before_it(monkeypatch):
    frames, analysis, model = synthetic_frames()[:4], load_face_analysis(), tiny_restorer(seed=6)
    context = model.encode_context([np.asarray(load_image(DATA / "macron_2.jpg").resize((64, 64)))])
    plan, _ = plan_tracks(analysis, frames, len(frames), None, "largest", None, 3, lambda line: None)
    calls = []
    original = RefFaceRestorer.restore_batch

    def restore_batch(self, faces, contexts, *args, **kwargs):
        calls.append((len(faces), contexts.latents.shape[1]))  # faces, references
        return original(self, faces, contexts, *args, **kwargs)

    monkeypatch.setattr(RefFaceRestorer, "restore_batch", restore_batch)
    alone, _ = restore_planned_frames(model, analysis, frames, plan, None, context, steps=2)
    assert calls == [(4, 1)]
    calls.clear()
    guided, _ = restore_planned_frames(model, analysis, frames, plan, None, context, previous_frame=True, steps=2)
    assert calls == [(1, 1), (1, 2), (1, 2), (1, 2)]  # one at a time; from the second frame, one reference more
    assert np.array_equal(alone[0], guided[0]) and not np.array_equal(alone[1], guided[1])
    with pytest.raises(RefFaceError, match="previous frame needs a model without Composite Context"):
        restore_planned_frames(model, analysis, frames, plan, None, CompositeContext(context.latents, torch.zeros(1)),
                               previous_frame=True, steps=2)  # fmt: skip


def test_previous_frame_does_not_guide_across_a_cut(monkeypatch):
    frames, analysis, model = synthetic_frames()[:4], load_face_analysis(), tiny_restorer(seed=6)
    context = model.encode_context([np.asarray(load_image(DATA / "macron_2.jpg").resize((64, 64)))])
    (track,) = plan_tracks(analysis, frames, len(frames), None, "largest", None, 1, lambda line: None)[0].values()
    plan = {0: {t: points + (60 * (t >= 2), 0) for t, points in track.items()}}  # the face jumps at frame 2: a cut
    references = []
    original = RefFaceRestorer.restore_batch

    def restore_batch(self, faces, contexts, *args, **kwargs):
        references.append(contexts.latents.shape[1])
        return original(self, faces, contexts, *args, **kwargs)

    monkeypatch.setattr(RefFaceRestorer, "restore_batch", restore_batch)
    restore_planned_frames(model, analysis, frames, plan, None, context, previous_frame=True, steps=1)
    assert references == [1, 2, 1, 2]
