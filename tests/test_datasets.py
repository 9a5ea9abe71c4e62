"""Training datasets on real photos: person folders (aligned and cached) and FFHQ-Ref's CSV layout."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refface_core.errors import RefFaceError
from refface_core.faces import align_face, load_face_analysis
from refface_core.images import load_image
from refface_core.training.datasets import FFHQRefDataset, PersonFolderDataset, augment_reference

FACES = Path(__file__).parent / "data" / "faces"
SIZE = 64


@pytest.fixture(scope="module")
def analysis():
    return load_face_analysis()


def person_tree(root: Path, people: dict[str, list[str]]) -> Path:
    for person, photos in people.items():
        (root / person).mkdir(parents=True)
        for photo in photos:
            shutil.copy(FACES / f"{photo}.jpg", root / person / f"{photo}.jpg")
    return root


def grey_photo(path: Path) -> None:
    Image.new("RGB", (320, 320), (128, 128, 128)).save(path)


@pytest.fixture
def people(tmp_path):
    return person_tree(
        tmp_path / "people",
        {"macron": ["macron_1", "macron_2"], "ardern": ["ardern_1", "ardern_2"], "sunak": ["sunak"]},
    )


def counting(monkeypatch, analysis) -> list[int]:
    calls = []
    detect = analysis.detect
    monkeypatch.setattr(analysis, "detect", lambda image: calls.append(1) or detect(image))
    return calls


def test_person_folders(people, tmp_path, analysis, monkeypatch):
    calls = counting(monkeypatch, analysis)
    data = PersonFolderDataset(people, analysis, tmp_path / "cache", size=SIZE, seed=3)
    assert len(calls) == 5  # every photo detected once
    assert len(data) == 4  # macron and ardern: 2 targets each; sunak has one photo
    assert len(data.problems) == 1 and "sunak" in data.problems[0] and "at least 2" in data.problems[0]

    sample = data[0]
    assert set(sample) == {"hq", "lq", "refs"}
    assert sample["hq"].shape == sample["lq"].shape == (3, SIZE, SIZE)
    assert sample["refs"].shape == (1, 3, SIZE, SIZE)
    for x in sample.values():
        assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert not torch.equal(sample["hq"], sample["lq"])

    for i, entry in enumerate(data.entries):  # references: the same person, never the target photo
        source = data.source_of[entry.target]
        for ref in data.references_for(i):
            assert data.source_of[ref].parent == source.parent and data.source_of[ref] != source

    # The cache: a second construction detects nothing and gives the same samples.
    again = PersonFolderDataset(people, analysis, tmp_path / "cache", size=SIZE, seed=3)
    assert len(calls) == 5 and again.problems == data.problems
    assert all(torch.equal(a, b) for a, b in zip(data[2].values(), again[2].values(), strict=True))


def test_refs_are_the_other_photo_unaugmented(people, tmp_path, analysis):
    data = PersonFolderDataset(people, analysis, tmp_path / "cache", size=SIZE, augment=False, num_refs=3)
    for i in range(len(data)):
        sample = data[i]
        assert sample["refs"].shape == (3, 3, SIZE, SIZE)  # one other photo, repeated into 3 slots
        assert all(torch.equal(ref, sample["refs"][0]) for ref in sample["refs"])
        assert not torch.equal(sample["refs"][0], sample["hq"])
        other = next(e for e in data.entries if e.target == data.entries[i].references[0])
        assert torch.equal(sample["refs"][0], data[data.entries.index(other)]["hq"])


def test_determinism_and_set_epoch(people, tmp_path, analysis):
    a = PersonFolderDataset(people, analysis, tmp_path / "cache", size=SIZE, seed=7)
    b = PersonFolderDataset(people, analysis, tmp_path / "cache", size=SIZE, seed=7)
    first = a[1]
    assert all(torch.equal(first[k], b[1][k]) for k in first)
    a.set_epoch(1)
    changed = a[1]
    assert torch.equal(changed["hq"], first["hq"]) or torch.equal(changed["hq"], first["hq"].flip(-1))
    assert not torch.equal(changed["lq"], first["lq"]) and not torch.equal(changed["refs"], first["refs"])
    a.set_epoch(0)
    assert all(torch.equal(first[k], a[1][k]) for k in first)
    other_seed = PersonFolderDataset(people, analysis, tmp_path / "cache", size=SIZE, seed=8)[1]
    assert not torch.equal(other_seed["lq"], first["lq"])


def test_person_folder_without_a_face(tmp_path, analysis, monkeypatch):
    root = person_tree(tmp_path / "people", {"macron": ["macron_1", "macron_2"], "ardern": ["ardern_1", "ardern_2"]})
    grey_photo(root / "macron" / "grey.png")
    calls = counting(monkeypatch, analysis)
    data = PersonFolderDataset(root, analysis, tmp_path / "cache", size=SIZE)
    assert len(data) == 4 and len(data.problems) == 1
    assert "no face found" in data.problems[0] and "grey.png" in data.problems[0]
    assert all(data.source_of[e.target].name != "grey.png" for e in data.entries)
    again = PersonFolderDataset(root, analysis, tmp_path / "cache", size=SIZE)  # the failure is cached as well
    assert len(calls) == 5 and again.problems == data.problems

    with pytest.raises(RefFaceError, match="no face found.*grey.png"):
        PersonFolderDataset(root, analysis, tmp_path / "cache2", size=SIZE, on_bad="abort")
    with pytest.raises(RefFaceError, match="grey.png"):  # also when the failure comes from the cache
        PersonFolderDataset(root, analysis, tmp_path / "cache", size=SIZE, on_bad="abort")


def test_person_folder_nothing_usable(tmp_path, analysis):
    root = person_tree(tmp_path / "people", {"sunak": ["sunak"]})
    with pytest.raises(RefFaceError, match="no usable training samples(.|\n)*sunak"):
        PersonFolderDataset(root, analysis, tmp_path / "cache", size=SIZE)
    with pytest.raises(RefFaceError, match="on_bad"):
        PersonFolderDataset(root, analysis, tmp_path / "cache", size=SIZE, on_bad="ignore")


# FFHQ-Ref: aligned crops named like FFHQ's images, a reference CSV and an identity-based split file.

PHOTOS = {"00000.png": "macron_1", "00001.png": "macron_2", "00002.png": "ardern_1", "00003.png": "ardern_2"}


@pytest.fixture(scope="module")
def ffhq(tmp_path_factory, analysis):
    root = tmp_path_factory.mktemp("ffhq")
    (root / "images").mkdir()
    (root / "lq").mkdir()
    for name, photo in [*PHOTOS.items(), ("01004.png", "obama")]:
        image = np.asarray(load_image(FACES / f"{photo}.jpg"))
        crop = align_face(image, analysis.main_face(image, photo).landmarks, 2 * SIZE)[0]
        folder = root / "images" / ("01000" if name == "01004.png" else "")  # FFHQ's own sub-folder layout
        folder.mkdir(exist_ok=True)
        Image.fromarray(crop).save(folder / name)
        Image.fromarray(crop // 2).save(root / "lq" / name)
    (root / "train_image.txt").write_text("00000.png\n00001.png\n00002.png\n00003.png\n\n")
    return root


def write_csv(path: Path, rows: list[tuple[str, str]], lq: bool = True) -> Path:
    header = "gt_image,lq_image,ref_image" if lq else "gt_image,ref_image"
    lines = [f'{gt},{gt},"{refs}"' if lq else f'{gt},"{refs}"' for gt, refs in rows]
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


GOOD = [
    ("00000.png", "['00001.png']"),
    ("00001.png", "['00000.png']"),
    ("00002.png", "['00003.png']"),
    ("00003.png", "['00002.png']"),
    ("01004.png", "['00000.png', '00001.png']"),
]


def test_ffhq_ref_parsing_and_split(ffhq, tmp_path):
    csv = write_csv(tmp_path / "train_references.csv", GOOD, lq=False)  # the train CSV has no lq_image
    data = FFHQRefDataset(csv, ffhq / "images", size=SIZE)
    assert len(data) == 5 and data.problems == []
    assert data.entries[4].target == ffhq / "images" / "01000" / "01004.png"
    assert data.entries[4].references == (ffhq / "images" / "00000.png", ffhq / "images" / "00001.png")
    sample = data[4]
    assert sample["hq"].shape == sample["lq"].shape == (3, SIZE, SIZE) and sample["refs"].shape == (1, 3, SIZE, SIZE)
    assert all(x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1 for x in sample.values())

    split = FFHQRefDataset(csv, ffhq / "images", size=SIZE, split=ffhq / "train_image.txt")
    assert [e.name for e in split.entries] == [gt for gt, _ in GOOD[:4]]
    with pytest.raises(RefFaceError, match="lq_image"):
        FFHQRefDataset(csv, ffhq / "images", size=SIZE, use_lq_images=True)


def test_ffhq_ref_num_refs(ffhq, tmp_path):
    csv = write_csv(tmp_path / "refs.csv", GOOD)
    data = FFHQRefDataset(csv, ffhq / "images", size=SIZE, num_refs=5, seed=1)
    listed = set(data.entries[4].references)
    picks = [data.references_for(4) for _ in range(2)]
    assert picks[0] == picks[1] and len(picks[0]) == 5 and set(picks[0]) == listed  # both used, repeated to fill
    assert data[4]["refs"].shape == (5, 3, SIZE, SIZE)
    one = FFHQRefDataset(csv, ffhq / "images", size=SIZE, num_refs=1)
    chosen = set()
    for epoch in range(8):
        one.set_epoch(epoch)
        chosen.update(one.references_for(4))
    assert chosen == listed  # one random reference a sample, a different one across epochs


def test_ffhq_ref_given_lq_images(ffhq, tmp_path):
    csv = write_csv(tmp_path / "test_references.csv", GOOD[:4])
    data = FFHQRefDataset(csv, ffhq / "images", size=SIZE, use_lq_images=True, augment=False, lq_root=ffhq / "lq")
    sample = data[0]
    expected = torch.from_numpy(np.array(load_image(ffhq / "lq" / "00000.png"))).permute(2, 0, 1).float()
    resized = torch.nn.functional.interpolate(expected[None], size=SIZE, mode="area")[0] / 127.5 - 1
    assert (sample["lq"] - resized).abs().max() < 0.05  # the given image (resized), not an online degradation
    assert torch.equal(sample["hq"], data[0]["hq"])


def test_ffhq_ref_bad_rows(ffhq, tmp_path):
    rows = [
        *GOOD[:4],
        ("00000.png", "['00001.png', '09999.png']"),  # a reference that does not exist
        ("09998.png", "['00001.png']"),  # a target that does not exist
        ("00001.png", "00000.png"),  # not a list
        ("00002.png", "__import__('os').system('touch pwned')"),  # never evaluated
        ("00003.png", "[]"),
    ]
    csv = write_csv(tmp_path / "refs.csv", rows)
    data = FFHQRefDataset(csv, ffhq / "images", size=SIZE)
    assert len(data) == 4 and len(data.problems) == 5
    assert "09999.png" in data.problems[0] and "reference not found" in data.problems[0]
    assert "line 6" in data.problems[0]
    assert "09998.png" in data.problems[1] and "target image not found" in data.problems[1]
    assert all("not a non-empty list" in p for p in data.problems[2:])
    assert not (Path.cwd() / "pwned").exists()
    with pytest.raises(RefFaceError, match="reference not found.*09999.png"):
        FFHQRefDataset(csv, ffhq / "images", size=SIZE, on_bad="abort")
    with pytest.raises(RefFaceError, match="CSV not found"):
        FFHQRefDataset(tmp_path / "absent.csv", ffhq / "images")


def test_augment_reference():
    image = np.asarray(load_image(FACES / "obama.jpg"))[:256, :256].copy()
    out = augment_reference(image, np.random.default_rng(0))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out, augment_reference(image, np.random.default_rng(0)))
    assert not np.array_equal(out, augment_reference(image, np.random.default_rng(1)))
    assert np.abs(out.astype(int) - image).mean() > 5
    assert np.array_equal(image, np.asarray(load_image(FACES / "obama.jpg"))[:256, :256])  # input untouched
    with pytest.raises(RefFaceError):
        augment_reference(image.astype(np.float32), np.random.default_rng(0))


def test_a_file_broken_after_the_check_is_skipped_or_aborts(ffhq, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(ffhq / "images", images)
    csv = write_csv(tmp_path / "refs.csv", GOOD[:4], lq=False)
    skip = FFHQRefDataset(csv, images, size=SIZE, augment=False)
    abort = FFHQRefDataset(csv, images, size=SIZE, augment=False, on_bad="abort")
    expected = skip[1]
    (images / "00000.png").write_bytes(b"not an image any more")
    sample = skip[0]  # 00000 is broken: sample 1 (whose reference, 00000, is broken too) gives way to sample 2
    assert torch.equal(sample["hq"], skip[2]["hq"]) and not torch.equal(sample["hq"], expected["hq"])
    assert "refface: skipped a sample:" in capsys.readouterr().err
    with pytest.raises(RefFaceError, match="00000.png"):
        abort[0]


def test_ffhq_ref_csv_that_cannot_be_read_is_named(ffhq, tmp_path):
    header, good = "gt_image,ref_image\n", "00000.png,\"['00001.png']\"\n"
    long = tmp_path / "long.csv"
    long.write_text(header + good + "00001.png,\"['" + "0" * 200_000 + ".png']\"\n")  # past csv's field limit
    with pytest.raises(RefFaceError, match=r"long.csv line 3 is not readable CSV \(field larger than field limit"):
        FFHQRefDataset(long, ffhq / "images", size=SIZE)
    unclosed = tmp_path / "unclosed.csv"
    unclosed.write_text(header + good + "00001.png,\"['00000.png']\n" + "00002.png,x\n" * 20_000)  # where it starts
    with pytest.raises(
        RefFaceError, match=r"unclosed.csv line 3 is not readable CSV .*check that its quotes are closed"
    ):
        FFHQRefDataset(unclosed, ffhq / "images", size=SIZE)
    latin = tmp_path / "latin.csv"
    latin.write_bytes((header + good + "00001.png,\"['caf\xe9.png']\"\n").encode("latin-1"))
    with pytest.raises(RefFaceError, match=r"latin.csv line 3 is not UTF-8 text \(invalid continuation byte\)"):
        FFHQRefDataset(latin, ffhq / "images", size=SIZE)
    bom = tmp_path / "bom.csv"  # as spreadsheet programs save UTF-8
    bom.write_bytes(b"\xef\xbb\xbf" + (header + good).encode())
    assert [e.name for e in FFHQRefDataset(bom, ffhq / "images", size=SIZE).entries] == ["00000.png"]
    split = tmp_path / "split.txt"
    split.write_bytes(b"00000.png\ncaf\xe9.png\n")
    with pytest.raises(RefFaceError, match=r"split file .*split.txt is not UTF-8 text"):
        FFHQRefDataset(bom, ffhq / "images", size=SIZE, split=split)


def test_ffhq_ref_names_outside_the_image_folder_are_refused(ffhq, tmp_path):
    shutil.copy(ffhq / "images" / "00000.png", tmp_path / "outside.png")  # a real image: refused for where it is
    outside = str(tmp_path / "outside.png")
    rows = [
        *GOOD[:4],
        ("00000.png", "['../../outside.png']"),
        ("00001.png", "['00000.png', '../../../../../../../etc/passwd']"),
        (outside, "['00001.png']"),
        ("00002.png", f"['{outside}']"),
        ("../images/00003.png", "['00002.png']"),
    ]
    csv = write_csv(tmp_path / "refs.csv", rows)
    data = FFHQRefDataset(csv, ffhq / "images", size=SIZE)
    assert len(data) == 4 and len(data.problems) == 5
    assert all("is not inside" in p and "relative to data.root" in p for p in data.problems)
    assert "line 6 (00000.png): ref_image '../../outside.png' is not inside" in data.problems[0]
    assert "gt_image '../images/00003.png'" in data.problems[4]  # even one that would come back in
    assert all(tmp_path not in e.target.parents and all(tmp_path not in r.parents for r in e.references)
               for e in data.entries)  # fmt: skip
    with pytest.raises(RefFaceError, match="ref_image '../../outside.png' is not inside"):
        FFHQRefDataset(csv, ffhq / "images", size=SIZE, on_bad="abort")

    lq = write_csv(tmp_path / "lq.csv", GOOD[:2])
    lq.write_text(lq.read_text().replace("00001.png,00001.png", "00001.png,../images/00001.png"))
    data = FFHQRefDataset(lq, ffhq / "images", size=SIZE, use_lq_images=True, lq_root=ffhq / "lq")
    assert len(data) == 1 and "lq_image '../images/00001.png' is not inside" in data.problems[0]

    linked = tmp_path / "linked"  # a dataset folder that is itself a symbolic link still works
    linked.symlink_to(ffhq / "images", target_is_directory=True)
    assert len(FFHQRefDataset(write_csv(tmp_path / "good.csv", GOOD[:4]), linked, size=SIZE)) == 4
