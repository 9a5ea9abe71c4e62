"""ReF-LDM's degradation pipeline: parameter ranges, seeding, severity ordering and the folder writer's safety."""

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refface_core import RefFaceError
from refface_core.images import load_image
from refface_core.training.degradations import (
    PRESETS,
    Degradation,
    degrade,
    degrade_folder,
    file_rng,
    gaussian_kernel,
    sample_parameters,
)

FACES = sorted((Path(__file__).parent / "data" / "faces").glob("*.jpg"))


def face(index: int = 0, size: int = 128) -> np.ndarray:
    """A real photo, centre-cropped square and shrunk, so the tests run in well under a second each."""
    im = load_image(FACES[index])
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    return np.asarray(im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC))


@pytest.mark.parametrize("name", ["train", "moderate", "severe"])
def test_parameters_stay_in_their_ranges(name):
    d = PRESETS[name]
    rng = np.random.default_rng(0)
    draws = [sample_parameters(d, rng) for _ in range(1000)]
    for key, (low, high) in [
        ("sigma_x", d.blur_sigma),
        ("sigma_y", d.blur_sigma),
        ("scale", d.scale),
        ("noise_sigma", d.noise_sigma),
        ("jpeg_quality", d.jpeg_quality),
    ]:
        values = np.array([p[key] for p in draws])
        assert values.min() >= low and values.max() <= high, key
        assert values.max() - values.min() > 0.8 * (high - low), key  # the range is actually explored
    assert all(isinstance(p["jpeg_quality"], int) for p in draws)
    kinds = [p["kernel"] for p in draws]
    assert 400 < kinds.count("aniso") < 600 and kinds.count("iso") + kinds.count("aniso") == 1000
    for p in draws:
        if p["kernel"] == "iso":
            assert p["sigma_y"] == p["sigma_x"] and p["rotation"] == 0.0
        else:
            assert -math.pi <= p["rotation"] <= math.pi
    assert d.kernel_size == 41


def test_presets_match_refldm():
    assert PRESETS["train"] == Degradation((0, 16), (1, 32), (0, 20), (30, 100), 41)
    assert PRESETS["moderate"] == Degradation((0, 8), (1, 8), (0, 15), (60, 100), 41)
    assert PRESETS["severe"] == Degradation((8, 16), (8, 32), (0, 20), (30, 100), 41)
    with pytest.raises(RefFaceError, match="scale"):
        Degradation((0, 1), (0.5, 2), (0, 1), (30, 100))
    with pytest.raises(RefFaceError, match="jpeg_quality"):
        Degradation((0, 1), (1, 2), (0, 1), (30, 101))
    with pytest.raises(RefFaceError, match="odd"):
        Degradation((0, 1), (1, 2), (0, 1), (30, 100), kernel_size=40)


def test_kernel_is_normalised_and_shaped():
    k = gaussian_kernel(41, 3.0, 3.0, 0.0)
    assert k.shape == (41, 41) and math.isclose(k.sum(), 1.0, rel_tol=1e-9)
    assert np.allclose(k, k.T) and np.unravel_index(k.argmax(), k.shape) == (20, 20)
    # The variance along x matches sigma_x² (the kernel is wide enough for sigma 3 not to be truncated).
    offsets = np.arange(-20, 21)
    assert math.isclose((k.sum(0) * offsets**2).sum(), 9.0, rel_tol=1e-3)
    # Anisotropic: long along x, and a quarter turn swaps the axes.
    a = gaussian_kernel(41, 6.0, 1.0, 0.0)
    assert (a.sum(0) * offsets**2).sum() > 10 * (a.sum(1) * offsets**2).sum()
    assert np.allclose(gaussian_kernel(41, 6.0, 1.0, math.pi / 2), a.T, atol=1e-12)
    # Sigma 0 is the identity.
    z = gaussian_kernel(41, 0.0, 0.0, 0.0)
    assert z[20, 20] == 1.0 and z.sum() == 1.0


def test_same_seed_same_output_and_shape():
    image = face(0)
    a = degrade(image, PRESETS["train"], np.random.default_rng(7))
    b = degrade(image, PRESETS["train"], np.random.default_rng(7))
    c = degrade(image, PRESETS["train"], np.random.default_rng(8))
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(degrade(image, PRESETS["train"], 7), a)  # an int is a seed
    wide = face(1)[:96]  # non-square keeps its size too
    assert degrade(wide, PRESETS["severe"], 0).shape == (96, 128, 3)
    assert np.array_equal(image, face(0))  # the input is left alone


def test_no_damage_when_ranges_are_trivial():
    gentle = Degradation(blur_sigma=(0, 0), scale=(1, 1), noise_sigma=(0, 0), jpeg_quality=(100, 100))
    image = face(2)
    out = degrade(image, gentle, 0)
    assert np.abs(out.astype(int) - image).mean() < 1.5  # only JPEG-100 rounding remains


def test_severe_degrades_more_than_moderate():
    images = [face(i) for i in range(3)]

    def error(preset: str) -> float:
        return float(
            np.mean(
                [
                    np.abs(degrade(im, PRESETS[preset], seed).astype(np.float32) - im).mean()
                    for im in images
                    for seed in range(4)
                ]
            )
        )

    moderate, severe = error("moderate"), error("severe")
    assert 0 < moderate < severe


def test_rejects_non_rgb_uint8():
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)):
        with pytest.raises(RefFaceError, match="RGB uint8"):
            degrade(bad, PRESETS["train"], 0)


def write_faces(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(face(i, 96)).save(folder / name)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_degrade_folder_is_reproducible_and_independent(tmp_path):
    src = tmp_path / "hq"
    write_faces(src, ["b.png", "a.jpg", "c.webp"])
    (src / "notes.txt").write_text("not an image")
    calls = []
    one = degrade_folder(src, tmp_path / "lq1", "moderate", seed=3, progress=lambda k, n: calls.append((k, n)))
    assert [p.name for p in one] == ["a.png", "b.png", "c.png"]
    assert sorted(p.name for p in (tmp_path / "lq1").iterdir()) == ["a.png", "b.png", "c.png"]
    assert calls == [(1, 3), (2, 3), (3, 3)]
    two = degrade_folder(src, tmp_path / "lq2", "moderate", seed=3)
    for p, q in zip(one, two, strict=True):
        assert pixels(p).shape == (96, 96, 3) and np.array_equal(pixels(p), pixels(q))
    # The file's result depends on (seed, its name) only: an extra file changes nothing for the others.
    Image.fromarray(face(4, 96)).save(src / "0.png")  # sorts first, so every other file's index shifts
    three = degrade_folder(src, tmp_path / "lq3", "moderate", seed=3)
    assert [p.name for p in three] == ["0.png", "a.png", "b.png", "c.png"]
    for p in one:
        assert np.array_equal(pixels(p), pixels(tmp_path / "lq3" / p.name))
    # And the seed matters.
    degrade_folder(src, tmp_path / "lq4", "moderate", seed=4)
    assert not np.array_equal(pixels(tmp_path / "lq4" / "a.png"), pixels(one[0]))
    # Image k is exactly degrade() with its own generator.
    expected = degrade(np.asarray(load_image(src / "a.jpg")), PRESETS["moderate"], file_rng(3, "a.jpg"))
    assert np.array_equal(pixels(one[0]), expected)


def test_degrade_folder_refuses(tmp_path):
    src = tmp_path / "hq"
    write_faces(src, ["a.png", "b.png"])
    with pytest.raises(RefFaceError, match="differ"):
        degrade_folder(src, src, "severe", 0)
    with pytest.raises(RefFaceError, match="differ"):
        degrade_folder(src, tmp_path / "hq" / ".." / "hq", "severe", 0)
    dst = tmp_path / "lq"
    dst.mkdir()
    (dst / "b.png").write_bytes(b"user data")
    with pytest.raises(RefFaceError, match="overwrite"):
        degrade_folder(src, dst, "severe", 0)
    assert sorted(p.name for p in dst.iterdir()) == ["b.png"] and (dst / "b.png").read_bytes() == b"user data"
    with pytest.raises(RefFaceError, match="preset"):
        degrade_folder(src, tmp_path / "x", "extreme", 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RefFaceError, match="no images"):
        degrade_folder(tmp_path / "empty", tmp_path / "y", "severe", 0)
    write_faces(src, ["a.jpg"])
    with pytest.raises(RefFaceError, match="both be written as a.png"):
        degrade_folder(src, tmp_path / "z", "severe", 0)


def test_degrade_folder_unreadable_image_leaves_nothing(tmp_path):
    src = tmp_path / "hq"
    write_faces(src, ["a.png"])
    (src / "b.jpg").write_bytes(b"not a jpeg")
    dst = tmp_path / "lq"
    with pytest.raises(RefFaceError, match="b.jpg"):
        degrade_folder(src, dst, "train", 0)
    assert list(dst.iterdir()) == []  # a.png, written first, was removed again
