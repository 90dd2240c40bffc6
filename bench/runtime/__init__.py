"""Benchmarks of the runtime: CUDA graphs, offload."""
