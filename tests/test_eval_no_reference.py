"""NIQE, checked against the scores pyiqa 0.1.16 gave the same photos (clean, degraded, not whole blocks) with a
pristine model fitted on the clean ones (tests/data/metrics/fid_noref_reference.py)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from refface_core.errors import RefFaceError
from refface_core.evaluation.no_reference import NIQE, NIQE_PARAMETERS

_SCRIPT = Path(__file__).parent / "data" / "metrics" / "fid_noref_reference.py"
_spec = importlib.util.spec_from_file_location("fid_noref_reference", _SCRIPT)
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)


def to_input(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.fixture(scope="module")
def niqe() -> NIQE:
    return NIQE.from_file(reference.NIQE_PARAMS)


@pytest.fixture(scope="module")
def scored(niqe) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    clean, degraded = reference.niqe_inputs()
    images = clean + degraded
    with np.load(reference.NIQE_REFERENCE) as data:
        assert reference.digest(images) == str(data["digest"]), "inputs changed (another Pillow?): rerun the script"
        expected = data["scores"]
    scores = np.array([float(niqe(to_input(image))[0]) for image in images])
    return images, scores, expected


def test_niqe_matches_pyiqa(scored):
    _, scores, expected = scored
    # equal to ~1e-11 on the machine that made them; the margin is for another CPU's float32 rounding of the
    # luminance, where Y * 255 lands on a half
    np.testing.assert_allclose(scores, expected, rtol=2e-4)


def test_niqe_scores_degraded_faces_worse(scored):
    _, scores, _ = scored
    clean_512, degraded = scores[:5], scores[6:]
    assert clean_512.max() < 2 and degraded.min() > 4  # blur, noise, pixelation: all far from the pristine model


def test_a_batch_scores_each_image_alone(niqe, scored):
    images, scores, _ = scored
    batch = torch.cat([to_input(image) for image in images[:3]])
    result = niqe(batch)
    assert result.shape == (3,) and result.dtype == torch.float64
    np.testing.assert_allclose(result.numpy(), scores[:3], rtol=1e-12)


def test_a_flat_image_scores_nan_without_failing(niqe, scored):
    images, scores, _ = scored
    batch = torch.cat([torch.zeros(1, 3, 512, 512), to_input(images[0])])
    result = niqe(batch)
    assert result[0].isnan() and result[1] == pytest.approx(scores[0], rel=1e-12)


def test_parameters_file_and_input_errors(tmp_path, niqe):
    with pytest.raises(RefFaceError, match=f"missing.mat: not found; NIQE needs {NIQE_PARAMETERS}, from .*release"):
        NIQE.from_file(tmp_path / "missing.mat")
    (tmp_path / "junk.mat").write_bytes(b"\x00" * 200)
    with pytest.raises(RefFaceError, match="junk.mat: not NIQE parameters"):
        NIQE.from_file(tmp_path / "junk.mat")
    scipy.io.savemat(tmp_path / "other.mat", {"mu": np.zeros(36)})
    with pytest.raises(RefFaceError, match="other.mat: not NIQE parameters .*mu_prisparam"):
        NIQE.from_file(tmp_path / "other.mat")
    scipy.io.savemat(tmp_path / "small.mat", {"mu_prisparam": np.zeros((1, 18)), "cov_prisparam": np.eye(18)})
    with pytest.raises(RefFaceError, match="36×36"):
        NIQE.from_file(tmp_path / "small.mat")
    with pytest.raises(RefFaceError, match="96×96 at least"):
        niqe(torch.zeros(1, 3, 95, 200))
