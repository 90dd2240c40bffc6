"""diffc runs cuBLASLt without a workspace unless the environment gives it one (diffc/blas_env.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from diffc import blas_env


def test_configure_sets_no_workspace_where_unset_and_keeps_a_given_value():
    env: dict[str, str] = {}
    assert blas_env.configure(env) == "0" and env == {"CUBLASLT_WORKSPACE_SIZE": "0"}
    env = {"CUBLASLT_WORKSPACE_SIZE": "32768"}
    assert blas_env.configure(env) == "32768" and env == {"CUBLASLT_WORKSPACE_SIZE": "32768"}


@pytest.mark.parametrize("given", [None, "4096"])
def test_importing_diffc_sets_the_variable_before_any_gemm(given):
    env = {k: v for k, v in os.environ.items() if k != "CUBLASLT_WORKSPACE_SIZE"}
    if given is not None:
        env["CUBLASLT_WORKSPACE_SIZE"] = given
    out = subprocess.run([sys.executable, "-c", "import os, diffc; print(os.environ['CUBLASLT_WORKSPACE_SIZE'])"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == (given or "0")
