"""The toy world: a small drawn world with known concepts, a toy diffusion model and CLIP trained on it."""
