"""Layouts and the flags' errors: no processes started."""

from __future__ import annotations

import argparse

import pytest

from diffc.cli.parallel import parallel_config
from diffc.errors import InvalidArgumentError
from diffc.parallel import ParallelConfig, resolve, valid_layouts
from diffc.parallel.config import check_model


def _args(**kw):
    base = dict(num_gpus=None, enable_cfg_parallel=None, ulysses_degree=None, ring_degree=None, parallel_timeout=None)
    return argparse.Namespace(**{**base, **kw})


def test_resolve_fills_the_missing_degree():
    assert resolve(4) == ParallelConfig(world=4, ulysses=4)
    assert resolve(4, cfg_parallel=True) == ParallelConfig(world=4, cfg=2, ulysses=2)
    assert resolve(8, cfg_parallel=True, ring=2) == ParallelConfig(world=8, cfg=2, ulysses=2, ring=2)
    assert resolve(4, ulysses=1) == ParallelConfig(world=4, ulysses=1, ring=4)


def test_inconsistent_layout_lists_the_valid_ones():
    with pytest.raises(InvalidArgumentError, match=r"--num-gpus.*cfg 2 x ulysses 2 x ring 2 = 8.*valid with 4: "
                                                   r"--ulysses-degree 1 --ring-degree 4; .*--enable-cfg-parallel"):
        resolve(4, cfg_parallel=True, ulysses=2, ring=2)
    with pytest.raises(InvalidArgumentError, match="--enable-cfg-parallel.*even number of GPUs, got 3"):
        resolve(3, cfg_parallel=True)
    with pytest.raises(InvalidArgumentError, match="--num-gpus.*cannot be split"):
        resolve(6, ring=4)
    assert valid_layouts(2) == ["--ulysses-degree 1 --ring-degree 2", "--ulysses-degree 2 --ring-degree 1",
                                "--enable-cfg-parallel --ulysses-degree 1 --ring-degree 1"]


def test_heads_not_divisible_by_ulysses_are_refused():
    check_model(ParallelConfig(world=4, ulysses=4), 12, "WanTransformer3DModel")
    with pytest.raises(InvalidArgumentError, match=r"--ulysses-degree.*24 attention heads.*degree 5.*1, 2, 3, 4, 6"):
        check_model(ParallelConfig(world=5, ulysses=5), 24, "FluxTransformer2DModel")


def test_flags_need_num_gpus_and_bad_values_are_named(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert parallel_config(_args()) is None
    assert parallel_config(_args(num_gpus=1)) is None
    with pytest.raises(InvalidArgumentError, match="--ring-degree.*needs --num-gpus"):
        parallel_config(_args(ring_degree=2))
    with pytest.raises(InvalidArgumentError, match="--num-gpus.*positive integer"):
        parallel_config(_args(num_gpus=0))
    with pytest.raises(InvalidArgumentError, match="--parallel-timeout"):
        parallel_config(_args(num_gpus=2, parallel_timeout=0))
    assert parallel_config(_args(num_gpus=2, ring_degree=2)) == ParallelConfig(world=2, ring=2)


def test_torchrun_world_size_is_the_layouts(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parallel_config(_args()) == ParallelConfig(world=2, ulysses=2)
    with pytest.raises(InvalidArgumentError, match="--num-gpus.*4 given, but 2 processes"):
        parallel_config(_args(num_gpus=4))


@pytest.mark.parametrize("env,name,got", [
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK", "'x'"),
    ({"RANK": "0", "WORLD_SIZE": "abc", "LOCAL_RANK": "0"}, "WORLD_SIZE", "'abc'"),
    ({"RANK": "5", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK", "'5'"),
    ({"RANK": "-1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK", "'-1'"),
    ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE", "'0'"),
    ({"RANK": "0", "WORLD_SIZE": "-3", "LOCAL_RANK": "0"}, "WORLD_SIZE", "'-3'"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "two"}, "LOCAL_RANK", "'two'"),
])
def test_junk_launcher_variables_are_one_line_at_once(monkeypatch, env, name, got):
    """Found by an audit: a ValueError traceback, or (a rank past the world) the whole rendezvous timeout and a C++
    stack, or (a world of 0 or less) a silent single-process run."""
    from diffc.cli.parallel import is_main

    for var, value in env.items():
        monkeypatch.setenv(var, value)
    for check in (lambda: parallel_config(_args()), is_main):
        with pytest.raises(InvalidArgumentError, match=rf"^{name}: must be an integer .*\(the launcher sets it\), "
                                                       rf"got {got}$"):
            check()


def test_degrees_and_devices_are_named_as_given(monkeypatch):
    from diffc.cli.parallel import check_devices

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(InvalidArgumentError, match=r"^--ring-degree: must be a positive integer, got -1$"):
        parallel_config(_args(num_gpus=4, ring_degree=-1))
    with pytest.raises(InvalidArgumentError, match=r"^--ulysses-degree: must be a positive integer, got 0$"):
        parallel_config(_args(num_gpus=4, ulysses_degree=0))
    with pytest.raises(InvalidArgumentError, match=r"^--device: 'foo' is not a device"):
        check_devices(ParallelConfig(world=2, ulysses=2), "foo")
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    with pytest.raises(InvalidArgumentError, match=r"^--num-gpus: 16 CPU processes asked for; at most 12 on this "
                                                   r"machine \(6 cores\)"):
        check_devices(ParallelConfig(world=16, ulysses=16), "cpu")
    assert check_devices(ParallelConfig(world=12, ulysses=12), "cpu") == "cpu"
