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
