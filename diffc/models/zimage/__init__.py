"""Z-Image (Tongyi-MAI/Z-Image, Z-Image-Turbo): a single-stream DiT over ``[image, caption]`` tokens."""
