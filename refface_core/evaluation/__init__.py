"""Evaluation of face restoration: identity, perceptual, fidelity, distribution and no-reference metrics."""
