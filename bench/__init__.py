"""Side-by-side benchmarks of diffc against diffusers; ``python -m bench.compare --help``."""
