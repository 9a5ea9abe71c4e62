"""Training: degradations, datasets, the identity losses and the accelerate trainer."""
