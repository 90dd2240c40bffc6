"""tests/conftest.py's skip of GPU test files in a process whose Triton runs interpreted."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import interpreted_gpu_tests

TESTS = Path(__file__).resolve().parent
FILES = [TESTS / "runtime" / "test_fp8_gpu.py", TESTS / "runtime" / "test_cudagraphs.py",
         TESTS / "ops" / "test_attention_fp8.py", TESTS / "ops" / "test_x_gpu.py", TESTS / "serve" / "test_serve_gpu.py"]


def test_gpu_files_outside_ops_skip_when_triton_is_interpreted_on_a_gpu():
    assert interpreted_gpu_tests(FILES, cuda=True, interpret="1") == [True, False, False, False, True]


def test_nothing_skips_without_a_gpu_or_without_the_interpreter():
    assert not any(interpreted_gpu_tests(FILES, cuda=False, interpret="1"))
    assert not any(interpreted_gpu_tests(FILES, cuda=True, interpret=None))
    assert not any(interpreted_gpu_tests(FILES, cuda=True, interpret="0"))
