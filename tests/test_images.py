"""Image loading: every common mode becomes upright 8-bit RGB; bad files give RefFaceError."""

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import tiny_restorer

from refface_core import RefFaceError
from refface_core.cli import main
from refface_core.faces import find_faces, load_face_analysis, prepare_references
from refface_core.files import write_atomic
from refface_core.images import load_image, load_photo, save_image


def test_modes_become_rgb(tmp_path):
    gray16 = Image.fromarray((np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 30).astype(np.uint16))
    gray16.save(tmp_path / "g16.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    Image.new("P", (8, 8), 3).save(tmp_path / "pal.png")
    for name in ("g16.png", "rgba.png", "pal.png"):
        im = load_image(tmp_path / name)
        assert im.mode == "RGB"
    top = np.asarray(load_image(tmp_path / "g16.png"))
    assert top.max() > 200 and top[0, 0, 0] == 0  # 16-bit range scaled, not clipped


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_errors_and_atomic_save(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(RefFaceError, match="not a readable image"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(RefFaceError, match="image not found"):
        load_image(tmp_path / "none.png")
    target = tmp_path / "out.png"
    save_image(Image.new("RGB", (4, 4)), target)
    assert load_image(target).size == (4, 4) and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(RefFaceError, match="output folder does not exist"):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "no" / "out.png")


def test_written_files_get_the_umask_permissions_or_keep_their_own(tmp_path):
    old = os.umask(0o022)
    try:
        save_image(Image.new("RGB", (4, 4)), tmp_path / "new.png")
        assert (tmp_path / "new.png").stat().st_mode & 0o777 == 0o644  # as open() would make it, not mkstemp's 0600
        (tmp_path / "shared.png").write_bytes(b"x")
        os.chmod(tmp_path / "shared.png", 0o664)
        save_image(Image.new("RGB", (4, 4)), tmp_path / "shared.png")
        assert (tmp_path / "shared.png").stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)


def test_an_interrupted_save_leaves_no_temporary_file_and_a_killed_ones_is_removed(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"precious")

    def interrupted(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt  # Ctrl-C, or SIGTERM as the CLI turns it

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, interrupted)
    assert target.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    killed = tmp_path / ".out.png.999999999.abcd1234.tmp"  # a process that is gone (pids stay below 2**22)
    alive = tmp_path / f".out.png.{os.getpid()}.efgh5678.tmp"  # one still writing
    other = tmp_path / ".out.png.2.png.999999999.abcdefgh.tmp"  # out.png.2.png's, being written
    for path in (killed, alive, other):
        path.write_bytes(b"half")
    save_image(Image.new("RGB", (4, 4)), target)
    assert not killed.exists() and alive.exists() and other.exists()


def test_sigterm_while_saving_unwinds_and_removes_the_temporary_file(tmp_path, monkeypatch, capsys):
    Image.new("RGB", (64, 64), (90, 60, 40)).save(tmp_path / "lq.png")
    Image.new("RGB", (32, 32), (80, 70, 50)).save(tmp_path / "ref.png")
    tiny_restorer(seed=1).save_pretrained(tmp_path / "model")
    real_save = Image.Image.save

    def save_then_terminated(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        if str(fp).endswith(".tmp"):
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a closing terminal would

    monkeypatch.setattr(Image.Image, "save", save_then_terminated)
    before = signal.getsignal(signal.SIGTERM)
    argv = ["restore", "--aligned", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "lq.png"),
            "--ref", str(tmp_path / "ref.png"), "--out", str(tmp_path / "out.png"), "--steps", "1"]  # fmt: skip
    assert main(argv) == 143
    assert "refface: terminated" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists() and not list(tmp_path.glob(".*.tmp"))
    assert signal.getsignal(signal.SIGTERM) == before  # main puts the handler back


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((0, 0, 3), np.uint8), "0×0 px: too small to hold a face"),
        (np.zeros((64, 64), np.uint8), "must be an H×W×3 RGB array, got shape (64, 64); convert grey or RGBA"),
        (np.zeros((64, 64, 4), np.uint8), "got shape (64, 64, 4)"),
        (np.zeros((64, 64, 3), np.float32), "must hold uint8 (or uint16) pixels, got float32"),
        (np.zeros((5, 20000, 3), np.uint8), "20000×5 px: too small to hold a face"),
        ("photo.png", "must be an H×W×3 RGB array, got str"),
    ],
)
def test_photos_given_to_the_api_are_checked(image, message):
    with pytest.raises(RefFaceError) as error:
        find_faces(load_face_analysis(), image)
    assert message in str(error.value)


def test_an_empty_reference_list_is_refused():
    with pytest.raises(RefFaceError, match="no reference photos given"):
        prepare_references(load_face_analysis(), [], 64)


def test_a_folder_this_user_cannot_enter_is_one_line(tmp_path, monkeypatch):
    """Python 3.11's is_dir() and exists() raise PermissionError there; RefFace says what it is."""
    locked = tmp_path / "locked"
    real_stat = Path.stat

    def stat(self, **kwargs):
        if self.is_relative_to(locked):
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(RefFaceError, match="cannot access .*locked/photo.jpg: Permission denied"):
        load_image(locked / "photo.jpg")
    with pytest.raises(RefFaceError, match="cannot access .*locked/out.png: Permission denied"):
        save_image(Image.new("RGB", (4, 4)), locked / "out.png")


def test_a_camera_makernote_too_big_for_jpeg_is_dropped_and_other_profiles_not_carried(tmp_path):
    from PIL import ImageCms

    exif = Image.Exif()
    exif[0x010F] = "Kodak"
    exif.get_ifd(0x8769)[0x927C] = b"m" * 65_000  # a MakerNote filling the JPEG's EXIF segment
    save_image(np.zeros((20, 20, 3), np.uint8), tmp_path / "out.jpg", {"software": "RefFace"}, exif=exif)
    with Image.open(tmp_path / "out.jpg") as im:
        kept = im.getexif()
        assert kept[0x010F] == "Kodak" and 0x927C not in kept.get_ifd(0x8769) and "RefFace" in kept[0x010E]

    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    Image.new("L", (20, 20), 90).save(tmp_path / "grey.png", icc_profile=lab)
    assert load_photo(tmp_path / "grey.png").icc is None  # it does not describe the RGB pixels read
