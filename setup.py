# All metadata lives in pyproject.toml. This file adds what pyproject cannot: the CUDA C++ kernels of csrc/
# travel inside the package (diffc/_csrc/), and where nvcc is found they are built ahead of time into cubins
# for the GPU archs nvcc knows among DIFFC_CUDA_ARCHS (default below). Without nvcc, diffc compiles them with
# NVRTC at first use (diffc/ops/csrc.py); editable installs read csrc/ from the checkout.
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "sm_89;sm_90;sm_100;sm_120"


def _sources_module():
    spec = importlib.util.spec_from_file_location("diffc_csrc_sources", ROOT / "diffc" / "ops" / "csrc_sources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home) / "bin" / "nvcc" if home else None
    return str(candidate) if candidate and candidate.is_file() else shutil.which("nvcc")


class BuildPyWithCsrc(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        sources = _sources_module()
        out = Path(self.build_lib) / "diffc" / sources.PACKAGED
        out.mkdir(parents=True, exist_ok=True)
        for path in sorted((ROOT / "csrc").glob("*.cu*")):
            shutil.copyfile(path, out / path.name)
        nvcc = _nvcc()
        if nvcc is None:
            return
        known = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout.split()
        wanted = [a for a in os.environ.get("DIFFC_CUDA_ARCHS", DEFAULT_ARCHS).split(";") if a]
        archs = [a for a in wanted if a.replace("sm_", "compute_") in known]
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]

        def compile_cubin(text, arch, path):
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "kernel.cu"
                src.write_text(text)
                subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-O3", "-std=c++17", "-o", str(path), str(src)],
                               check=True)

        sources.build_ahead(ROOT / "csrc", out, archs, compile_cubin, version)


setup(cmdclass={"build_py": BuildPyWithCsrc})
