"""Image loading: every common mode becomes upright 8-bit RGB; bad files give RefFaceError."""

import numpy as np
import pytest
from PIL import Image

from refface_core import RefFaceError
from refface_core.images import load_image, save_image


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
    import os

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
