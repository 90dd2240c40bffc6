"""``diffc run --cache ...``: the flags, a config file's cache section, the perf dump's cache entry, and
each bad flag refused by its name."""

from __future__ import annotations

import json

import pytest

from diffc.cli.main import main


def run(ckpt, tmp_path, *extra: str) -> int:
    return main(["run", "--model", str(ckpt), "--prompt", "a calico cat", "--height", "32", "--width", "32",
                 "--steps", "3", "--seed", "1", "--no-progress", "--output", str(tmp_path / "out.png"), *extra])


def test_cache_flags_reach_the_generation_and_the_perf_dump(flux_checkpoint, tmp_path, capsys):
    perf = tmp_path / "perf.json"
    code = run(flux_checkpoint("dev-tiny"), tmp_path, "--cache", "fbcache", "--cache-threshold", "50",
               "--cache-warmup-steps", "1", "--cache-taylorseer", "--perf-dump-path", str(perf))
    assert code == 0
    assert "fbcache skipped 2 of 3 DiT forwards" in capsys.readouterr().out
    cache = json.loads(perf.read_text())["runtime"]["cache"]
    assert cache["kind"] == "fbcache" and cache["options"] == {"threshold": 50.0, "warmup_steps": 1,
                                                                "taylorseer": True, "taylorseer_order": 1}
    assert cache["skipped_steps"] == [1, 2] and [s["computed"] for s in cache["steps"]] == [1, 0, 0]
    assert cache["middle_blocks"] == {"computed": 2, "skipped": 4}


def test_config_file_cache_section_under_the_flags(flux_checkpoint, tmp_path, capsys):
    cfg, perf = tmp_path / "cfg.yaml", tmp_path / "perf.json"
    cfg.write_text("cache:\n  kind: dbcache\n  Fn: 1\n  bn: 1\n  threshold: 0.5\n  max_skips: 1\n  warmup_steps: 0\n")
    code = run(flux_checkpoint("dev-tiny"), tmp_path, "--config", str(cfg), "--cache-threshold", "0",
               "--perf-dump-path", str(perf))
    assert code == 0, capsys.readouterr().err
    cache = json.loads(perf.read_text())["runtime"]["cache"]
    assert cache["options"] == {"threshold": 0.0, "fn": 1, "bn": 1, "warmup_steps": 0, "max_skips_in_a_row": 1}
    assert cache["forwards"] == {"computed": 3, "skipped": 0}


@pytest.mark.parametrize("flags,config,fragment", [
    (["--cache-threshold", "0.1"], None, "--cache-threshold: needs --cache dbcache, fbcache or teacache"),
    (["--cache", "fbcache", "--cache-bn", "1"], None, "--cache-bn: is not an option of fbcache"),
    (["--cache", "dbcache", "--cache-max-skips", "0"], None, "--cache-max-skips: must be an integer from 1"),
    (["--cache", "teacache", "--cache-threshold", "1e9"], None, "--cache-threshold: must be a number from 0 to 100"),
    (["--cache", "dbcache", "--cache-fn", "3"], None, "--cache-fn: fn=3 + bn=0 leaves no middle block"),
    (["--cache", "lazy"], None, "invalid choice: 'lazy'"),
    ([], "cache:\n  kind: dbcache\n  treshold: 0.1\n", "cache.treshold (in"),
    ([], "cache:\n  threshold: 0.1\n", "needs a 'kind'"),
    ([], "cache: magic\n", "must be one of dbcache, fbcache, teacache, none"),
])
def test_bad_cache_flags_are_refused_by_name(flux_checkpoint, tmp_path, capsys, flags, config, fragment):
    if config is not None:
        (tmp_path / "cfg.yaml").write_text(config)
        flags = [*flags, "--config", str(tmp_path / "cfg.yaml")]
    try:
        code = run(flux_checkpoint("dev-tiny"), tmp_path, *flags)
    except SystemExit as exc:  # argparse's own choices
        code = exc.code
    assert code == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()
