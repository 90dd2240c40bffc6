"""The parallelism layer of a DiT stack: CFG batch split and sequence sharding through module hooks.

::

    DiT forward pre-hook   CFG-parallel: keep this CFG group's half of the batched arguments
      block pre-hooks      shard the token stream (first block) and the per-token tables (every block)
      attention            the USP attention installed in ``models/attention_hook.py``
      last block hook      all-gather the token stream over the sequence group
    DiT forward hook       CFG-parallel: all-gather the halves of the prediction (the guidance combine)

What a family shards is data (:data:`SHARDING`): the block argument holding the token stream, the
replicated text prefix (FLUX's joint attention), the RoPE tables and other per-token arguments, where
the stream is in the last block's output, and which DiT arguments are batched. The hooks are module
hooks, so they run around whatever forward the executor installed (eager, compiled region graphs),
and under ``bare()`` too: the compiler traces the blocks with the shapes each rank runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InvalidArgumentError
from ..models import attention_hook
from ..models.structure import dit_regions
from .attention import USPAttention, set_runtime
from .config import check_model


@dataclasses.dataclass(frozen=True)
class Arg:
    """A block argument: its name and position (models call their blocks positionally)."""

    name: str
    position: int


@dataclasses.dataclass(frozen=True)
class Sharding:
    """How a family's DiT is split: see the module docstring."""

    stream: Arg
    rope: Arg
    rope_dim: int  # the sequence dimension of each RoPE table
    batched: tuple[str, ...]  # DiT keyword arguments with a batch dimension (CFG-parallel splits them)
    prefix: Arg | None = None  # replicated text stream: its length is the replicated prefix of attention and RoPE
    per_token: tuple[tuple[Arg, int], ...] = ()  # (argument, sequence dim) sharded when it has one row per token
    output: int | None = None  # the stream's index in the last block's output (None: the output is the stream)
    tokens: Callable[[nn.Module, dict], int] = lambda dit, kw: kw["hidden_states"].shape[1]  # stream length


def _wan_tokens(dit: nn.Module, kwargs: dict) -> int:
    sizes = kwargs["hidden_states"].shape[2:]
    return math.prod(n // p for n, p in zip(sizes, dit.config.patch_size))


SHARDING = {
    "FluxTransformer2DModel": Sharding(
        stream=Arg("hidden_states", 0), prefix=Arg("encoder_hidden_states", 1), rope=Arg("rope", 3), rope_dim=0,
        output=1, batched=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance",
                           "modulation")),
    "WanTransformer3DModel": Sharding(
        stream=Arg("x", 0), rope=Arg("rope", 3), rope_dim=1, per_token=((Arg("temb", 2), 1),),
        batched=("hidden_states", "timestep", "encoder_hidden_states"), tokens=_wan_tokens),
}


def _get(args: tuple, kwargs: dict, arg: Arg):
    return args[arg.position] if len(args) > arg.position else kwargs.get(arg.name)


def _set(args: tuple, kwargs: dict, arg: Arg, value) -> tuple[tuple, dict]:
    if len(args) > arg.position:
        args = args[:arg.position] + (value,) + args[arg.position + 1:]
    else:
        kwargs = {**kwargs, arg.name: value}
    return args, kwargs


def _all_gather(x: torch.Tensor, dim: int, group, size: int) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


class ParallelDiT:
    """One DiT's parallelism layer on this rank; :meth:`attach` installs the hooks, :meth:`detach` removes them."""

    def __init__(self, module: nn.Module, mesh):
        name = type(module).__name__
        if name not in SHARDING:
            raise InvalidArgumentError("--num-gpus", f"{name} has no multi-GPU support yet; supported: "
                                       f"{', '.join(sorted(SHARDING))}")
        self.module, self.mesh, self.spec = module, mesh, SHARDING[name]
        config = mesh.config
        check_model(config, module.config.num_attention_heads, name)
        self.attention = USPAttention(mesh)
        self.blocks = [b for region in dit_regions(module) for b in region.blocks]
        self.handles: list[Any] = []
        self.full = 0  # tokens of the whole stream in the current forward
        self.split = False  # whether the current forward runs this CFG group's half of the batch
        self.rope_cache: tuple[Any, Any] | None = None  # (full tables, this rank's shard)
        self.counters = {"forwards": 0, "cfg_split": 0, "cfg_replicated": 0}

    # ---- install --------------------------------------------------------------------------------

    def attach(self) -> None:
        set_runtime(self.attention)
        attention_hook.install(self.attention if self.mesh.config.sequence > 1 else None)
        m = self.module
        self.handles.append(m.register_forward_pre_hook(self._dit_pre, with_kwargs=True))
        self.handles.append(m.register_forward_hook(self._dit_post, with_kwargs=True))
        if self.mesh.config.sequence > 1:
            for block in self.blocks:
                self.handles.append(block.register_forward_pre_hook(self._block_pre, with_kwargs=True))
            self.handles.append(self.blocks[-1].register_forward_hook(self._last_block_post))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if attention_hook.installed() is self.attention:
            attention_hook.install(None)
        set_runtime(None)

    @property
    def graph_safe(self) -> bool:
        """NCCL collectives can be captured in a CUDA graph (the hooks decide on shapes only); gloo's cannot."""
        return dist.get_backend() == "nccl"

    @property
    def graphs_reason(self) -> str:
        if not self.graph_safe:
            return "the gloo backend's collectives cannot be captured in a CUDA graph"
        return ("several GPUs: CUDA graphs around the collectives are opt-in (--cuda-graphs on); NCCL "
                "captures them, but a graph per shape holds its communication buffers")

    def describe(self) -> dict[str, Any]:
        return {**self.mesh.describe(), **self.counters, "attention_calls": self.attention.calls}

    # ---- CFG-parallel ---------------------------------------------------------------------------

    def _batch(self, kwargs: dict) -> int:
        return kwargs["hidden_states"].shape[0]

    def _dit_pre(self, module, args, kwargs):
        if torch.compiler.is_compiling():  # the compiler traces the shapes the hooks already produced
            return None
        self.counters["forwards"] += 1
        self.rope_cache, self.split = None, False
        if args:
            raise InvalidArgumentError("transformer", "a multi-GPU DiT is called with keyword arguments only")
        n = self.mesh.config.sequence
        if n > 1:
            self.full = self.spec.tokens(module, kwargs)
            if self.full % n:
                raise InvalidArgumentError(
                    "height", f"this size gives {self.full} tokens per frame stack, which the sequence-parallel "
                    f"degree {n} (ulysses x ring) does not divide; pick a height/width (and frames) whose "
                    f"token count divides by {n}")
        cfg = self.mesh.config.cfg
        if cfg == 1:
            return None
        batch = kwargs["hidden_states"].shape[0]
        if batch % cfg:
            self.counters["cfg_replicated"] += 1  # nothing to split (one prompt, no CFG pair): every rank runs it
            return None
        self.counters["cfg_split"] += 1
        self.split = True
        half, index = batch // cfg, self.mesh.cfg_index
        out = dict(kwargs)
        for name in self.spec.batched:
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
                out[name] = value[index * half:(index + 1) * half]
        return args, out

    def _dit_post(self, module, args, kwargs, output):
        if torch.compiler.is_compiling() or not self.split:
            return None
        self.split = False
        return _all_gather(output, 0, self.mesh.cfg_group, self.mesh.config.cfg)

    # ---- sequence parallel ----------------------------------------------------------------------

    def _shard(self, x: torch.Tensor, dim: int, start: int = 0) -> torch.Tensor:
        n = self.mesh.config.sequence
        size = (x.shape[dim] - start) // n
        lo = start + self.mesh.seq_index * size
        shard = x.narrow(dim, lo, size)
        if start:
            shard = torch.cat([x.narrow(dim, 0, start), shard], dim=dim)
        return shard

    def _block_pre(self, block, args, kwargs):
        if torch.compiler.is_compiling():
            return None
        spec = self.spec
        prefix = 0
        if spec.prefix is not None:
            prefix = _get(args, kwargs, spec.prefix).shape[1]
        stream = _get(args, kwargs, spec.stream)
        if stream.shape[1] == self.full:  # the first block: the whole stream arrives
            args, kwargs = _set(args, kwargs, spec.stream, self._shard(stream, 1))
        self.attention.prefix = prefix
        rope = _get(args, kwargs, spec.rope)
        if rope is not None and rope[0].shape[spec.rope_dim] == prefix + self.full:
            cached = self.rope_cache
            if cached is None or cached[0][0] is not rope[0]:
                shard = tuple(self._shard(t, spec.rope_dim, prefix) for t in rope)
                self.rope_cache = cached = (rope, shard)
            args, kwargs = _set(args, kwargs, spec.rope, cached[1])
        for arg, dim in spec.per_token:
            value = _get(args, kwargs, arg)
            if isinstance(value, torch.Tensor) and value.shape[dim] == self.full:
                args, kwargs = _set(args, kwargs, arg, self._shard(value, dim))
        return args, kwargs

    def _last_block_post(self, block, args, output):
        if torch.compiler.is_compiling():
            return None
        n, index = self.mesh.config.sequence, self.spec.output
        if index is None:
            return _all_gather(output, 1, self.mesh.seq_group, n)
        out = list(output)
        out[index] = _all_gather(out[index], 1, self.mesh.seq_group, n)
        return tuple(out)

