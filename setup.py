# All metadata lives in pyproject.toml. This file exists only for the csrc/ CUDA
# extensions, which later issues build here when a CUDA toolkit is present.
from setuptools import setup

setup()
