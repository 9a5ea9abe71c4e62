"""The photo's tone for restored faces. Old photos are often black-and-white, sepia or faded; restored from colour
references, a face would come out in colour and stand out of such a photo."""

from __future__ import annotations

import cv2
import numpy as np

GRAY_SPREAD = 8  # channel spread (0-255) that JPEG rounding and scanning leave in a black-and-white photo


def is_grayscale(photo: np.ndarray) -> bool:
    """True when nearly every pixel's channels agree: a black-and-white photo, even as an RGB JPEG."""
    sample = photo[:: max(1, photo.shape[0] // 256), :: max(1, photo.shape[1] // 256)].astype(np.int16)
    return float(np.percentile(sample.max(2) - sample.min(2), 99)) <= GRAY_SPREAD


def match_tone(restored: np.ndarray, lq_crop: np.ndarray, grayscale: bool) -> np.ndarray:
    """``restored`` (an aligned face crop) in the tone of ``lq_crop``, the same crop of the photo: grey for a
    black-and-white photo, else its colour moved to the photo's (mean and spread of Lab's a and b, measured on the
    face, the spread never raised). The lightness stays the restorer's."""
    if grayscale:
        return np.repeat(cv2.cvtColor(restored, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    lab = cv2.cvtColor(restored.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    photo_lab = cv2.cvtColor(cv2.resize(lq_crop, restored.shape[1::-1]).astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    n = restored.shape[0]
    face = (slice(int(0.35 * n), int(0.8 * n)), slice(int(0.3 * n), int(0.7 * n)))  # eyes to chin, FFHQ alignment
    for channel in (1, 2):
        ours, theirs = lab[face][..., channel], photo_lab[face][..., channel]
        spread = min(1.0, float(theirs.std()) / max(float(ours.std()), 1e-3))
        lab[..., channel] = (lab[..., channel] - ours.mean()) * spread + theirs.mean()
    rgb = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
