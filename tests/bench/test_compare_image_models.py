"""CPU smoke test of the benchmark glue for Z-Image (bench.specs / bench.families): eager configs only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.families import FAMILIES
from bench.specs import SPECS, Workload

pytest.importorskip("diffusers")
REPO = Path(__file__).resolve().parents[2]


def test_zimage_tiny_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench.compare", "--model", "z-image-tiny", "--out-dir", str(out),
                           "--ckpt-dir", str(tmp_path / "ckpt"), "--steps", "2", "--repeats", "1", "--warmup", "1",
                           "--configs", "diffusers-eager,diffc-eager"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("cpu-*-z-image-tiny.json")
    data = json.loads(path.read_text())
    diffc = data["configs"]["diffc-eager"]
    assert "error" not in diffc, diffc.get("traceback")
    assert diffc["dit_rel_err"] < 1e-4 and float(diffc["psnr_db"]) > 35.0


@pytest.mark.parametrize("name", ["z-image-turbo", "flux-kontext"])
def test_real_size_specs(name):
    spec = SPECS[name]
    family = FAMILIES[spec.family]
    wl = Workload.from_spec(spec)
    flops = family.dit_flops(spec, wl).total
    # Z-Image-Turbo 1024^2: 4096 image + 128 caption tokens through 6 B parameters; Kontext: FLUX.1-dev on 8192 + 512
    assert (40e12 < flops < 80e12) if name == "z-image-turbo" else (150e12 < flops < 250e12)
    assert family.forwards_per_step(wl) == 1
