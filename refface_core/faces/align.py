"""FFHQ-style alignment to a 5-point template, and pasting restored crops back with a feathered mask."""

from __future__ import annotations

import cv2
import numpy as np

from ..errors import RefFaceError

# The 5-point template of FFHQ-aligned 512×512 faces used by restoration models (facexlib's face_template),
# in insightface landmark order: image-left eye, image-right eye, nose tip, left and right mouth corners.
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
     [313.08905, 371.15118]],
    dtype=np.float32,
)  # fmt: skip


def alignment_transform(landmarks: np.ndarray, size: int = 512) -> np.ndarray:
    """The 2×3 similarity transform taking a face's 5 landmarks onto the template at ``size`` pixels."""
    template = FFHQ_TEMPLATE_512 * (size / 512)
    affine, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), template, method=cv2.LMEDS)
    if affine is None:
        raise RefFaceError(f"cannot align a face from degenerate landmarks {landmarks.tolist()}")
    return affine


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Warp the face to an aligned ``size``×``size`` crop; returns (crop, affine photo->crop)."""
    affine = alignment_transform(landmarks, size)
    crop = cv2.warpAffine(image, affine, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)
    return crop, affine


def paste_mask(affine: np.ndarray, crop_size: int, photo_shape: tuple[int, ...]) -> np.ndarray:
    """Float mask in photo space: 1 inside the crop's footprint, feathered towards its edges."""
    h, w = photo_shape[:2]
    inverse = cv2.invertAffineTransform(affine)
    mask = cv2.warpAffine(np.ones((crop_size, crop_size), np.float32), inverse, (w, h), flags=cv2.INTER_LINEAR)
    feather = _feather(affine, crop_size)
    mask = cv2.erode(mask, np.ones((2 * feather + 1, 2 * feather + 1), np.uint8))
    return cv2.GaussianBlur(mask, (0, 0), sigmaX=feather / 2 + 1e-3)


def _feather(affine: np.ndarray, crop_size: int) -> int:
    """The seam's width in photo pixels: a twentieth of the crop's width there. The blur reaches twice as far."""
    return max(1, int(crop_size / np.sqrt(abs(np.linalg.det(affine[:, :2]))) / 20))


def scale_affine(affine: np.ndarray, factor_x: float, factor_y: float) -> np.ndarray:
    """The photo->crop ``affine`` for the photo resized by these factors (pixel centres: x = (x' + 0.5) / f - 0.5)."""
    factors = np.array([factor_x, factor_y])
    scaled = affine.copy()
    scaled[:, :2] = affine[:, :2] / factors
    scaled[:, 2] = affine[:, 2] + affine[:, :2] @ (0.5 / factors - 0.5)
    return scaled


def paste_back(photo: np.ndarray, crop: np.ndarray, affine: np.ndarray, crop_size: int | None = None) -> np.ndarray:
    """Blend ``crop`` (aligned with ``affine``) back into a copy of ``photo``; call once per face. ``crop_size``:
    the size ``affine`` was made for, when the crop has been resized since. Only the crop's footprint is touched."""
    if crop_size is not None:
        scale = crop.shape[0] / crop_size
        affine = affine * scale
        affine[:, 2] += (scale - 1) / 2  # pixel centres: (u + 0.5) · scale − 0.5
    h, w = photo.shape[:2]
    inverse = cv2.invertAffineTransform(affine)
    n = crop.shape[0]
    corners = np.array([[0, 0], [n, 0], [0, n], [n, n]], np.float64) @ inverse[:, :2].T + inverse[:, 2]
    margin = 2 * _feather(affine, n) + 3  # where the feathered mask still reaches
    x0, y0 = np.clip(np.floor(corners.min(0)).astype(int) - margin, 0, [w, h])
    x1, y1 = np.clip(np.ceil(corners.max(0)).astype(int) + margin, 0, [w, h])
    out = photo.copy()
    if x1 <= x0 or y1 <= y0:
        return out
    roi_affine = affine.copy()
    roi_affine[:, 2] += affine[:, :2] @ np.array([x0, y0], np.float64)  # photo ROI pixel (u, v) is (u + x0, v + y0)
    roi = photo[y0:y1, x0:x1]
    warped = cv2.warpAffine(
        crop, cv2.invertAffineTransform(roi_affine), (x1 - x0, y1 - y0), flags=cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_REPLICATE,
    )  # fmt: skip
    mask = paste_mask(roi_affine, n, roi.shape)[..., None]
    depth = np.iinfo(photo.dtype).max / np.iinfo(crop.dtype).max  # an 8-bit face into a 16-bit photo
    blended = mask * warped.astype(np.float32) * depth + (1 - mask) * roi.astype(np.float32)
    out[y0:y1, x0:x1] = np.clip(blended.round(), 0, np.iinfo(photo.dtype).max).astype(photo.dtype)
    return out
