"""The fp8 tier's quantization ops: ``python -m bench.ops.bench_fp8_quant``.

- ``quantize_rows``: an activation no fused kernel produces, rowwise (FLUX.1's single-block ``proj_out``
  input: 4608 tokens x 15,360; Wan2.1's attention output: 32,760 x 1536 / 5120);
- ``quantize_rows_cat``: the same over ``cat([a, b], -1)`` without writing it (FLUX.1's single-block ``proj_out``
  input: attention output 3072 + MLP 12,288 over 4608 tokens); ``quantize_rows_cat_gelu``: with b the MLP's
  ``gelu_tanh(h + bias)``, computed on the way;
- ``quantize_heads``: attention's v per (batch item, head) (Wan2.1-1.3B 12 x 128, -14B 40 x 128, FLUX.1 24 x 128);
  ``quantize_heads_cat``: the same over FLUX.1's joint text + image values (512 + 4096 tokens) without
  concatenating them (against ``heads flux v 4608tok``: what reading two pieces costs);
- ``qk_fp8_head_scales``: q's and k's static scales from their norm weights (one tiny launch per attention);
- ``gelu_tanh_fp8``: the feed-forward's bias + tanh-GELU quantized rowwise (FLUX.1 4096 x 12,288; Wan2.1
  32,760 x 8960 / 13,824), the fp8 tier's largest producer.

``quantize_rows`` and ``gelu_tanh_fp8`` have CUDA C++ kernels (``csrc/``): the ``triton`` column times
their Triton kernels on the same inputs.

The reference is the torch sequence the op replaces (``*_ref``), bf16 in, fp8 + float32 scales out.
"""

from __future__ import annotations

import torch

from bench.ops import Case, nbytes, norm_weight, randn, run
from diffc.ops.attention_fp8 import quantize_heads_ref
from diffc.ops.fp8 import FP8, quantize_rows_ref
from diffc.ops.gelu_tanh import gelu_tanh_ref
from diffc.ops.quantize_rows import quantize_rows_cat_gelu_ref
from diffc.ops.qk_norm_rope_fp8 import qk_fp8_scales

ROWS = {  # name: (tokens, width)
    "flux single proj_out 4608x15360": (4608, 15360),
    "wan-1.3b attn out 32760x1536": (32760, 1536),
    "wan-14b attn out 32760x5120": (32760, 5120),
}
CATS = {  # name: (tokens, width of a, width of b)
    "flux single 4608x(3072+12288)": (4608, 3072, 12288),
}
GELU = {  # name: (tokens, hidden)
    "flux ff 4096x12288": (4096, 12288),
    "wan-1.3b ffn 32760x8960": (32760, 8960),
    "wan-14b ffn 32760x13824": (32760, 13824),
}
HEADS = {  # name: (tokens, heads)
    "flux v 4608tok 24x128": (4608, 24),
    "wan-1.3b v 32760tok 12x128": (32760, 12),
    "wan-14b v 32760tok 40x128": (32760, 40),
}

HEAD_CATS = {  # name: (text tokens, image tokens, heads)
    "flux v 512+4096tok 24x128": (512, 4096, 24),
}


def _gelu_fp8_ref(x, bias):
    return quantize_rows_ref(gelu_tanh_ref(x, bias))


def _scales_ref(qw, kw, heads, head_dim):
    return qk_fp8_scales(qw, heads, head_dim, True), qk_fp8_scales(kw, heads, head_dim, True)


def cases(dtype: torch.dtype, device="cuda") -> list[Case]:
    out = []
    for name, (tokens, width) in ROWS.items():
        x = randn(1, tokens, width, dtype=dtype, device=device, seed=1)
        outs = (torch.empty(x.shape, dtype=FP8, device=device), torch.empty(tokens, 1, device=device))

        def rows(x=x, outs=outs):
            torch.ops.diffc.quantize_rows(x, *outs)

        out.append(Case(f"rows {name}", quantize_rows_ref, (x,), rows, outs, nbytes(x, *outs)))
    for name, (tokens, ka, kb) in CATS.items():
        wide = randn(1, tokens, 3 * ka, dtype=dtype, device=device, seed=9)
        a = wide[..., :ka]  # a strided view, as the attention output sliced from a wider buffer
        b = randn(1, tokens, kb, dtype=dtype, device=device, seed=10)
        outs = (torch.empty(1, tokens, ka + kb, dtype=FP8, device=device), torch.empty(tokens, 1, device=device))

        def cat(a=a, b=b, outs=outs):
            torch.ops.diffc.quantize_rows_cat(a, b, *outs)

        out.append(Case(f"rows-cat {name}", lambda a, b: quantize_rows_ref(torch.cat([a, b], -1)), (a, b), cat, outs,
                        nbytes(a, b, *outs)))
        bias = randn(kb, dtype=dtype, device=device, seed=11)
        outs = (torch.empty(1, tokens, ka + kb, dtype=FP8, device=device), torch.empty(tokens, 1, device=device))

        def cat_gelu(a=a, h=b, bias=bias, outs=outs):
            torch.ops.diffc.quantize_rows_cat_gelu(a, h, bias, *outs)

        out.append(Case(f"rows-cat-gelu {name}", quantize_rows_cat_gelu_ref, (a, b, bias), cat_gelu, outs,
                        nbytes(a, b, bias, *outs)))
    for name, (tokens, hidden) in GELU.items():
        x = randn(1, tokens, hidden, dtype=dtype, device=device, seed=3)
        bias = randn(hidden, dtype=dtype, device=device, seed=4)
        outs = (torch.empty(x.shape, dtype=FP8, device=device), torch.empty(tokens, 1, device=device))

        def gelu(x=x, bias=bias, outs=outs):
            torch.ops.diffc.gelu_tanh_fp8(x, bias, *outs)

        out.append(Case(f"gelu {name}", _gelu_fp8_ref, (x, bias), gelu, outs, nbytes(x, bias, *outs)))
    for name, (tokens, heads) in HEADS.items():
        v = randn(1, tokens, heads, 128, dtype=dtype, device=device, seed=2)
        outs = (torch.empty(v.shape, dtype=FP8, device=device), torch.empty(1, heads, device=device))

        def per_head(v=v, outs=outs):
            torch.ops.diffc.quantize_heads(v, *outs)

        out.append(Case(f"heads {name}", quantize_heads_ref, (v,), per_head, outs, nbytes(v, *outs)))
    for name, (text, image, heads) in HEAD_CATS.items():
        a = randn(1, text, heads, 128, dtype=dtype, device=device, seed=5)
        b = randn(1, image, heads, 128, dtype=dtype, device=device, seed=6)
        outs = (torch.empty(1, text + image, heads, 128, dtype=FP8, device=device),
                torch.empty(1, heads, device=device))

        def joint(a=a, b=b, outs=outs):
            torch.ops.diffc.quantize_heads_cat(a, b, *outs)

        out.append(Case(f"heads-cat {name}", lambda a, b: quantize_heads_ref(torch.cat([a, b], 1)), (a, b), joint,
                        outs, nbytes(a, b, *outs)))
    qw, kw = (norm_weight(40 * 128, dtype, device, seed=s) for s in (3, 4))
    outs = (torch.empty(40, device=device), torch.empty(40, device=device))

    def scales(qw=qw, kw=kw, outs=outs):
        torch.ops.diffc.qk_fp8_head_scales(qw, kw, None, None, 40, 128, True, *outs)

    out.append(Case("scales wan-14b 40x128", lambda q, k: _scales_ref(q, k, 40, 128), (qw, kw), scales, outs,
                    nbytes(qw, kw, *outs)))
    return out


if __name__ == "__main__":
    run("diffc::quantize_rows / quantize_heads / qk_fp8_head_scales", cases)
