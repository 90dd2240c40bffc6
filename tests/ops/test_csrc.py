"""The CUDA C++ kernels of ``csrc/`` without a GPU: the sources compile with NVRTC for the GPUs they serve and
define every kernel the launchers ask for; the ahead-of-time cubins are used only with their own source; the
row launch shapes; and where the kernels cannot run, the Triton kernels do (GPU checks: test_csrc_gpu.py)."""

from __future__ import annotations

import json

import pytest
import torch

from diffc.ops import csrc, csrc_sources, gemv
from tests.ops.common import randn

# stem -> the kernel names its launcher builds: f"{stem}_{dtype}_{vectors per thread}"
KERNELS = {stem: [f"{stem}_{dt}_{nv}" for dt in csrc.DTYPE_NAMES.values() for nv in csrc.MAX_THREADS]
           for stem in ("quantize_rows", "gelu_tanh_fp8")}
# adaln_rows_<activation dtype>_<modulation dtype>_<NV>: bf16/fp16 rows, modulation of their dtype or float32
KERNELS["adaln_rows"] = [f"adaln_rows_{act}_{mod}_{nv}" for act in ("bf16", "f16") for mod in (act, "f32")
                         for nv in csrc.MAX_THREADS]
# gemv_<activation dtype>_<weight dtype>_<rows per warp>_<vectors in flight>: the instance diffc.ops.gemv launches
KERNELS["gemv"] = [f"gemv_{x}_{w}_{gemv.CSRC_ROWS_PER_WARP}_{gemv.CSRC_VECTORS_IN_FLIGHT}"
                   for x in csrc.DTYPE_NAMES.values() for w in (x, "fp8")]


def _nvrtc():
    cc = pytest.importorskip("cuda.core", reason="cuda-python is not installed (diffc[cuda])")
    try:
        cc.Program("extern \"C\" __global__ void k() {}", "c++", cc.ProgramOptions(arch="sm_90")).compile("cubin")
    except Exception as exc:  # no libnvrtc on this machine
        pytest.skip(f"NVRTC cannot compile here: {exc}")
    return cc


def test_every_source_has_its_launcher():
    assert csrc_sources.stems(csrc_sources.source_dir()) == sorted(KERNELS)


@pytest.mark.parametrize("arch", ["sm_89", "sm_90", "sm_100"])
@pytest.mark.parametrize("stem", sorted(KERNELS))
def test_source_compiles_and_defines_the_launched_kernels(stem, arch):
    cc = _nvrtc()
    text = csrc_sources.source(stem, csrc_sources.source_dir())
    cubin = bytes(cc.Program(text, "c++", cc.ProgramOptions(arch=arch, std="c++17", name=stem)).compile("cubin").code)
    assert cubin.startswith(b"\x7fELF")
    for name in KERNELS[stem]:
        assert b"\0" + name.encode() + b"\0" in cubin, name  # an extern "C" symbol of the cubin


def test_nvrtc_builds_are_cached_across_processes(tmp_path, monkeypatch):
    _nvrtc()
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path))
    text = csrc_sources.source("quantize_rows", csrc_sources.source_dir())
    first = bytes(csrc._compile("quantize_rows", text, "sm_90").code)
    entries = [p for p in (tmp_path / "kernels" / "csrc").rglob("*") if p.is_file()]
    assert entries and any(p.read_bytes() == first for p in entries)  # the cubin itself, no pickle or framing
    assert bytes(csrc._compile("quantize_rows", text, "sm_90").code) == first
    other = bytes(csrc._compile("quantize_rows", text + "\n// changed\n", "sm_90").code)
    assert len([p for p in (tmp_path / "kernels" / "csrc").rglob("*") if p.is_file()]) == len(entries) + 1
    assert other.startswith(b"\x7fELF")


def test_source_pastes_its_includes_once(tmp_path):
    (tmp_path / "common.cuh").write_text("#pragma once\n#include \"more.cuh\"\nint a;\n")
    (tmp_path / "more.cuh").write_text("int b;\n")
    (tmp_path / "k.cu").write_text("#include \"common.cuh\"\n#include \"more.cuh\"\nint c;\n")
    text = csrc_sources.source("k", tmp_path)
    assert "#include" not in text and text.count("int b;") == 1 and text.index("int a;") < text.index("int c;")
    (tmp_path / "bad.cu").write_text("#include \"missing.cuh\"\n")
    with pytest.raises(FileNotFoundError, match="missing.cuh"):
        csrc_sources.source("bad", tmp_path)
    with pytest.raises(FileNotFoundError, match="nothere.cu"):
        csrc_sources.source("nothere", tmp_path)
    assert "#include" not in csrc_sources.source("quantize_rows", csrc_sources.source_dir())


def test_ahead_of_time_cubin_serves_only_its_own_source(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "common.cuh").write_text("#pragma once\nint a;\n")
    (src / "k.cu").write_text("#include \"common.cuh\"\nint b;\n")
    built = []

    def compile_cubin(text, arch, path):
        built.append(arch)
        path.write_bytes(b"\x7fELF" + arch.encode())

    manifest = csrc_sources.build_ahead(src, out, ["sm_90", "sm_100"], compile_cubin, "nvcc 13.0")
    assert built == ["sm_90", "sm_100"] and manifest["kernels"]["k"]["archs"] == ["sm_90", "sm_100"]
    text = csrc_sources.source("k", src)
    assert csrc_sources.ahead_of_time("k", "sm_90", out, text) == out / "k.sm_90.cubin"
    assert csrc_sources.ahead_of_time("k", "sm_89", out, text) is None  # not built for that GPU
    (src / "common.cuh").write_text("#pragma once\nint a2;\n")  # the header changed since the build
    assert csrc_sources.ahead_of_time("k", "sm_90", out, csrc_sources.source("k", src)) is None
    (out / "k.sm_100.cubin").unlink()
    assert csrc_sources.ahead_of_time("k", "sm_100", out, text) is None
    (out / csrc_sources.MANIFEST).write_text("{not json")
    assert csrc_sources.ahead_of_time("k", "sm_90", out, text) is None
    (out / csrc_sources.MANIFEST).write_text(json.dumps({"kernels": {"k": "x"}}))
    assert csrc_sources.ahead_of_time("k", "sm_90", out, text) is None


# width -> (vectors per thread, threads) for bfloat16 rows; production: FLUX.1 12,288 / 15,360, Wan2.1 5120 / 8960 /
# 13,824 (FLUX.1's 3072 and Wan2.1-1.3B's 1536 stay with Triton)
ROW_LAUNCHES = {4096: (1, 512), 4104: (2, 288), 5120: (2, 320), 8960: (4, 288), 15360: (4, 480), 32768: (8, 512)}


@pytest.mark.parametrize("width", ROW_LAUNCHES)
def test_row_launch_covers_the_row_in_whole_warps(width):
    nv, threads = csrc.row_launch(width, torch.bfloat16)
    assert (nv, threads) == ROW_LAUNCHES[width]
    assert threads % 32 == 0 and threads <= min(csrc.MAX_THREADS[nv], csrc.TARGET_THREADS)
    assert nv * threads * 8 >= width > nv * (threads - 32) * 8  # the fewest whole warps


@pytest.mark.parametrize("width,nv,expected", [(5120, 4, (4, 160)), (1536, 4, (4, 64)), (4096, 1, (1, 512)),
                                               (32768, 4, (4, 1024)), (1536, 16, (16, 32)), (16384, 1, (4, 512))])
def test_row_launch_takes_the_vectors_per_thread_an_op_measured(width, nv, expected):
    """(4, 160) for Wan2.1-14B's 5120-wide rows; where nv vectors a thread need more threads than its instance
    allows, the default search decides."""
    assert csrc.row_launch(width, torch.bfloat16, min_vectors=0, vectors_per_thread=nv) == expected


@pytest.mark.parametrize("width,dtype", [(7, torch.bfloat16), (1536, torch.bfloat16), (4092, torch.bfloat16),
                                         (32776, torch.bfloat16), (2044, torch.float32), (32768, torch.float32),
                                         (8192, torch.float64)])
def test_row_launch_refuses_what_the_kernels_do_not_cover(width, dtype):
    assert csrc.row_launch(width, dtype) is None


def test_cpu_tensors_and_the_switch_leave_the_triton_kernels(monkeypatch, counters):
    assert "not a CUDA GPU" in csrc.unavailable(torch.device("cpu")) or "cuda-python" in csrc.unavailable("cpu")
    assert csrc.kernel("quantize_rows", "quantize_rows_bf16_1", torch.device("cpu")) is None
    with csrc.disabled():
        assert "switched off" in csrc.unavailable(torch.device("cuda"))
    monkeypatch.setenv("DIFFC_CSRC", "0")
    assert "switched off" in csrc.unavailable(torch.device("cuda"))
    monkeypatch.delenv("DIFFC_CSRC")
    x = randn(3, 64, dtype=torch.bfloat16, seed=1)
    q, s = torch.empty(3, 64, dtype=torch.float8_e4m3fn), torch.empty(3, 1)
    torch.ops.diffc.quantize_rows(x, q, s)
    assert counters.kernel_launches == 1 and counters.csrc_launches == 0


def test_an_edit_to_a_cuda_source_invalidates_compiled_artifacts(tmp_path, monkeypatch):
    """The artifact's source hashes (``pass_sources``) cover csrc/: a changed kernel is a stale artifact."""
    from diffc.compile.compiler import pass_sources

    for path in csrc_sources.source_dir().glob("*.cu*"):
        (tmp_path / path.name).write_text(path.read_text())
    monkeypatch.setattr(csrc_sources, "source_dir", lambda: tmp_path)
    before = pass_sources()
    (tmp_path / "common.cuh").write_text((tmp_path / "common.cuh").read_text() + "\n// edited\n")
    after = pass_sources()
    assert after["csrc"] != before["csrc"] and {k: v for k, v in after.items() if k != "csrc"} == {
        k: v for k, v in before.items() if k != "csrc"}
