"""Unified sequence-parallel attention: Ulysses all-to-all over heads, ring attention over the sequence.

Each rank of a sequence group holds one shard of the image/video tokens (and, for FLUX's joint
attention, the whole text prefix, replicated). :class:`USPAttention` turns the local q, k, v into
the attention over the whole sequence:

1. Ulysses (degree U): one all-to-all sends head group j of the local tokens to rank j, so each rank
   holds H/U heads of the U shards of its Ulysses group; the replicated text keeps its own H/U heads.
2. Ring (degree R): the key/value blocks of the R Ulysses groups travel around a ring (send to the
   next rank while attending to the current block); partial results merge with the online softmax,
   weighting each by ``exp(lse_i - lse)`` with ``lse = logaddexp(lse, lse_i)``. The text keys and
   values are attended once, with the local block.
3. The inverse all-to-all brings the image tokens back to all heads; the text output, computed for
   H/U heads on each rank, is all-gathered over the heads.

Cross-attention to replicated text (Wan's ``attn2``) needs no communication: every rank attends its
own queries to the whole text. ``torch.ops.diffc.sp_attention`` is the op a traced DiT block holds, so
a compiled region graph runs the collectives between its fused kernels.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

aten = torch.ops.aten


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its log-sum-exp: q (B, H, Sq, D), k/v (B, H, Sk, D) -> out (B, H, Sq, D) float32,
    lse (B, H, Sq) float32, from the attention kernel where it returns one, else computed in float32."""
    sq = q.shape[2]
    try:
        if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
            out, lse = aten._scaled_dot_product_flash_attention(q, k, v)[:2]
            return out.float(), lse[..., :sq].float()
        if q.device.type == "cuda":
            out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
            return out.float(), lse[..., :sq].float()
        if q.device.type == "cpu":
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
            return out.float(), lse.float()
    except RuntimeError:  # a shape or dtype the kernel refuses: the plain computation below
        pass
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.float()), lse


def merge(out: torch.Tensor | None, lse: torch.Tensor | None, out_i: torch.Tensor, lse_i: torch.Tensor):
    """Online-softmax merge of two partial attentions over disjoint key sets (all float32)."""
    if out is None:
        return out_i, lse_i
    new = torch.logaddexp(lse, lse_i)
    return out * torch.exp(lse - new)[..., None] + out_i * torch.exp(lse_i - new)[..., None], new


class USPAttention:
    """This rank's sequence-parallel attention (:mod:`diffc.parallel.mesh`'s groups); ``prefix`` is the
    replicated text length of the DiT call being run (FLUX; 0 for Wan), set by the sharding layer."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.u, self.r = mesh.config.ulysses, mesh.config.ring
        self.prefix = 0
        self.calls = 0

    def __call__(self, q, k, v, cross: bool = False):
        return torch.ops.diffc.sp_attention(q, k, v, cross, int(self.prefix))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cross: bool, prefix: int) -> torch.Tensor:
        self.calls += 1
        if cross or self.u * self.r == 1:
            return F.scaled_dot_product_attention(q, k, v).contiguous()
        qkv = torch.stack([q, k, v])  # (3, B, H, P + S_loc, D)
        text, qkv = qkv[:, :, :, :prefix], qkv[:, :, :, prefix:]
        if self.u > 1:
            qkv = self._seq_to_heads(qkv)  # (3, B, H/U, U * S_loc, D)
            h = qkv.shape[2]
            text = text[:, :, self.mesh.ulysses_index * h:(self.mesh.ulysses_index + 1) * h]
        if self.r > 1:
            out = self._ring(qkv, text)
        else:
            q, k, v = (torch.cat([t, x], dim=2) if prefix else x for t, x in zip(text, qkv))
            out = F.scaled_dot_product_attention(q, k, v)
        out_text, out = out[:, :, :prefix], out[:, :, prefix:]
        if self.u > 1:
            out = self._heads_to_seq(out.contiguous())
            if prefix:
                parts = [torch.empty_like(out_text.contiguous()) for _ in range(self.u)]
                dist.all_gather(parts, out_text.contiguous(), group=self.mesh.ulysses_group)
                out_text = torch.cat(parts, dim=1)
        return torch.cat([out_text, out], dim=2) if prefix else out.contiguous()

    # ---- Ulysses ----------------------------------------------------------------------------------

    def _seq_to_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        # (3, B, H, S, D) sequence shard -> (3, B, H/U, U*S, D) head shard; chunk j of the heads goes to rank j
        three, b, h, s, d = qkv.shape
        send = qkv.reshape(three, b, self.u, h // self.u, s, d).permute(2, 0, 1, 3, 4, 5).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.mesh.ulysses_group)  # recv[j]: rank j's sequence shard
        return recv.permute(1, 2, 3, 0, 4, 5).reshape(three, b, h // self.u, self.u * s, d)

    def _heads_to_seq(self, out: torch.Tensor) -> torch.Tensor:
        # (B, H/U, U*S, D) -> (B, H, S, D): sequence chunk j goes back to rank j
        b, h, ss, d = out.shape
        send = out.reshape(b, h, self.u, ss // self.u, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.mesh.ulysses_group)  # recv[j]: rank j's heads
        return recv.permute(1, 0, 2, 3, 4).reshape(b, self.u * h, ss // self.u, d)

    # ---- ring -------------------------------------------------------------------------------------

    def _ring(self, qkv: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """qkv (3, B, h, S, D): local queries and the first key/value block; text (3, B, h, P, D)."""
        mesh, r = self.mesh, self.r
        q = torch.cat([text[0], qkv[0]], dim=2) if text.shape[3] else qkv[0]
        kv = qkv[1:].contiguous()
        nxt_rank = mesh.ring_ranks[(mesh.ring_index + 1) % r]
        prev_rank = mesh.ring_ranks[(mesh.ring_index - 1) % r]
        out = lse = None
        for step in range(r):
            pending = None
            if step < r - 1:
                incoming = torch.empty_like(kv)
                pending = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, nxt_rank, mesh.ring_group),
                                                  dist.P2POp(dist.irecv, incoming, prev_rank, mesh.ring_group)])
            k, v = kv[0], kv[1]
            if step == 0 and text.shape[3]:
                k, v = torch.cat([text[1], k], dim=2), torch.cat([text[2], v], dim=2)
            out, lse = merge(out, lse, *attention_lse(q, k, v))
            if pending is not None:
                for request in pending:
                    request.wait()
                kv = incoming
        return out.to(qkv.dtype)


_RUNTIME: list[USPAttention | None] = [None]


def set_runtime(attention: USPAttention | None) -> None:
    _RUNTIME[0] = attention


@torch.library.custom_op("diffc::sp_attention", mutates_args=())
def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cross: bool, prefix: int) -> torch.Tensor:
    """Sequence-parallel attention of this rank's shard (see the module docstring)."""
    runtime = _RUNTIME[0]
    if runtime is None:
        raise RuntimeError("diffc::sp_attention ran in a process with no sequence-parallel layout")
    return runtime.attend(q, k, v, cross, prefix)


@sp_attention.register_fake
def _sp_attention_fake(q, k, v, cross, prefix):
    return q.new_empty(q.shape)
