"""Fuse self-attention's RMSNorm + RoPE on q and k into ``torch.ops.diffc.qk_norm_rope_*``.

Wan (``qk_norm_rope_across_heads``), unfused, for q and for k, after :mod:`.canonicalize`::

    x  = aten.unflatten(aten.rms_norm(x_lin, [H*D], weight, eps), 2, [H, -1])     # (B, S, H, D)
    x1, x2 = aten.unbind(aten.unflatten(x, -1, [-1, 2]), -1)
    x  = aten.flatten(aten.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1), -2)  # [to(x, bf16)]

FLUX single-stream block (``qk_norm_rope_per_head``), for q and for k::

    x  = aten.transpose(aten.rms_norm(aten.unflatten(x_lin, -1, [-1, D]), [D], weight, eps), 1, 2)
    x0, x1 = aten.unbind(aten.reshape(x, [B, H, S, -1, 2]), -1)
    rot = aten.flatten(aten.stack([-x1, x0], -1), 3)
    x  = x * cos + rot * sin                  # bf16: to(to(x, f32) * cos + to(rot, f32) * sin, bf16)

Fused, one launch for q and k::

    q_out, k_out = empty(...), empty(...)
    diffc.qk_norm_rope_<layout>(unflatten(q_lin), unflatten(k_lin), q_weight, k_weight, cos, sin, eps,
                                [0,] q_out, k_out)

diffusers' attention processors that keep heads after the tokens (``unflatten(2, (H, -1))``, a per-head
``RMSNorm`` module, which :mod:`.rms_norm` turns into ``aten.rms_norm``, and ``apply_rotary_emb(x, (cos, sin),
sequence_dim=1)``, e.g. HunyuanVideo) are the FLUX form without the transpose, on (1, S, 1, D) tables,
fused into the same op writing a (B, H, S, D)-strided view of a (B, S, H, D) buffer.

FLUX's double-stream block normalises text and image tokens with their own weights and concatenates
them before RoPE: two ``qk_norm_rope_per_head`` calls write the text rows (offset 0) and the image rows
(offset S_txt) of one (B, H, S_txt + S_img, D) buffer each for q and k, so the ``cat`` goes too.
"""

from __future__ import annotations

from .base import FusionPass
from .qk_norm_rope_forms import AcrossHeads, AcrossHeadsDowncast, PerHead, PerHeadCast, PerHeadJoint, PerHeadJointCast
from .qk_norm_rope_seq_first import (PerHeadSeqFirst, PerHeadSeqFirstCast, PerHeadSeqFirstShared,
                                     PerHeadSeqFirstSharedCast)


class QKNormRopePass(FusionPass):
    """Self-attention's q/k RMSNorm + RoPE -> ``diffc.qk_norm_rope_across_heads`` (Wan) and
    ``diffc.qk_norm_rope_per_head`` (FLUX; diffusers' attention with heads after the tokens, e.g.
    HunyuanVideo's image stream). Not bit-exact: the RMS reduction order differs."""

    name = "qk_norm_rope"
    bit_exact = False
    patterns = (AcrossHeadsDowncast(), AcrossHeads(), PerHeadJointCast(), PerHeadJoint(), PerHeadCast(), PerHead(),
                PerHeadSeqFirstCast(), PerHeadSeqFirst(), PerHeadSeqFirstSharedCast(), PerHeadSeqFirstShared())
