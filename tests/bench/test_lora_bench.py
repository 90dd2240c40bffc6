"""CPU smoke test of bench/lora.py on the tiny FLUX spec: it runs, writes its JSON and Markdown, unmerges exactly."""

from __future__ import annotations

import json

from bench.lora import main


def test_lora_bench_smoke(tmp_path):
    assert main(["--model", "flux-tiny", "--device", "cpu", "--rank", "8", "--repeats", "1", "--warmup", "1",
                 "--switches", "1", "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]) == 0
    (path,) = (tmp_path / "out").glob("cpu-*-lora-flux-tiny.json")
    result = json.loads(path.read_text())
    dit = result["dit"]
    assert dit["unmerge_bit_exact"] is True and dit["addresses_unchanged"] is True
    assert dit["modules"] > 0 and dit["rank"] == 8 and dit["host_copy_bytes"] > 0
    assert set(dit["dit_forward_ms"]) == {"base", "merged", "after_unmerge"}
    assert path.with_suffix(".md").read_text().startswith("# LoRA on flux-tiny")
