"""FlashAttention-4 under a key mask, three ways, at one shape: which costs least, and are they right.

``diffc::attention_fa4_key_mask`` copies each batch element's kept keys and values to the front (a sort and two
gathers) and runs FA4 over that many keys (``seqused_k``). FA4's CuTe kernels can instead read the mask
themselves: a ``mask_mod`` that looks the key up in the mask (no copy; every key block masked element by element),
and the same ``mask_mod`` with block sparsity built on the device from the mask (blocks of 128 keys: all kept ->
run unmasked, some kept -> run masked, none kept -> skipped). This probe times each beside the masked SDPA and FA4
over keys already compacted (the floor), checks each against a float32 masked SDPA on several masks (a prefix, holes,
two batch elements with different masks, an element that keeps no key), and prints one line per form::

    python -m bench.ops.fa4_key_mask_forms --image-tokens 4096 --text-tokens 128 --kept 40 --out forms.json

Defaults: Qwen-Image 1024² (24 heads x 128, a 40-token prompt padded to 128, text first).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.ops import graphed_ms


BLOCK = 128  # FA4's key tile at head_dim <= 128 on Hopper: the unit of its block-sparse lists


def key_block_lists(keep: torch.Tensor, seq_q: int, block: int = BLOCK) -> tuple[torch.Tensor, ...]:
    """FA4's block-sparse lists for a key mask ``keep`` (B, S_kv) bool: ``(partial_cnt, partial_idx, full_cnt,
    full_idx)`` int32, (B, 1, M) and (B, 1, M, N), every query block alike. A key block whose keys are all kept is
    full (run unmasked), one with some kept partial (run under the mask), one with none kept in neither list
    (skipped); each list holds its blocks first, in order. On the device, no host read."""
    batch, seq = keep.shape
    n = -(-seq // block)
    kept = F.pad(keep, (0, n * block - seq)).view(batch, n, block).sum(-1)
    m = -(-seq_q // block)

    def listed(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort(torch.logical_not(flags).to(torch.uint8), dim=1, stable=True).to(torch.int32)
        count = flags.sum(-1, dtype=torch.int32)
        return (count[:, None, None].expand(batch, 1, m).contiguous(),
                order[:, None, None].expand(batch, 1, m, n).contiguous())

    full = kept == block
    return (*listed((kept > 0) & ~full), *listed(full))


def _key_kept_mod():
    """FA4's ``mask_mod`` for a key mask: aux tensor 0 is the mask as (B, S_kv) int32, nonzero where kept."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    @cute.jit
    def key_kept(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        kept = utils.scalar_to_ssa(aux_tensors[0][batch[0], kv_idx[0]], cutlass.Int32)
        return kept != utils.scalar_to_ssa(0, cutlass.Int32)

    return key_kept


def fa4_in_kernel_mask(q, k, v, keep, mod, block_sparse: bool):
    """FA4 reading the key mask itself (no copy of k and v); (B, H, S, D) in and out."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    blocks = None
    if block_sparse:
        blocks = BlockSparseTensorsTorch(*key_block_lists(keep, q.shape[2]), block_size=(BLOCK, BLOCK))
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False, mask_mod=mod,
                          aux_tensors=[keep.to(torch.int32)], block_sparse_tensors=blocks)
    return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)


def forms():
    from diffc.ops.attention_key_padding import attention_fa4_key_mask

    mod = _key_kept_mod()
    return {
        "masked_sdpa": lambda q, k, v, keep: F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :]),
        "compaction": lambda q, k, v, keep: attention_fa4_key_mask(q, k, v, keep[:, None, None, :]),
        "mask_mod": lambda q, k, v, keep: fa4_in_kernel_mask(q, k, v, keep, mod, block_sparse=False),
        "mask_mod_blocks": lambda q, k, v, keep: fa4_in_kernel_mask(q, k, v, keep, mod, block_sparse=True),
    }


def _masks(batch: int, text: int, image: int, kept: int, device) -> dict[str, torch.Tensor]:
    s = text + image
    prefix = torch.ones(batch, s, dtype=torch.bool, device=device)
    prefix[:, kept:text] = False
    holes = prefix.clone()
    holes[:, 3:kept:5] = False
    two = prefix.clone()
    if batch > 1:
        two[1, kept // 2:text] = False
    none = prefix.clone()
    none[0] = False
    return {"prefix": prefix, "holes": holes, "two_lengths": two, "none_kept": none}


def _check_forms(table: dict, record: dict, case: str, q, k, v, keep: torch.Tensor) -> None:
    """Each form against a float32 masked SDPA on ``keep`` (zeros where an element keeps no key, as torch gives);
    its relative error (or why it failed) recorded under ``case`` and printed."""
    ref = torch.nan_to_num(F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                          attn_mask=keep[:, None, None, :]))
    for name, fn in table.items():
        try:
            out = fn(q, k, v, keep).float()
            err = ((out - ref).norm() / ref.norm().clamp_min(1e-6)).item()
            entry = f"rel err {err:.1e}" + (" NaN" if out.isnan().any() else "")
        except Exception as e:  # noqa: BLE001 - a probe: report the form's failure and go on
            entry = f"error {type(e).__name__}: {str(e)[:200]}"
        record["forms"].setdefault(name, {})[case] = entry
        print(f"{case:12s} {name:16s} {entry}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--image-tokens", type=int, default=4096)
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--kept", type=int, default=40, help="text tokens kept (the rest is padding)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    for field in ("heads", "head_dim", "image_tokens", "text_tokens"):
        if getattr(args, field) < 1:
            raise SystemExit(f"--{field.replace('_', '-')}: expected a positive integer, got {getattr(args, field)}")
    if not 1 <= args.kept <= args.text_tokens:
        raise SystemExit(f"--kept: expected 1 to --text-tokens ({args.text_tokens}), got {args.kept}")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    s, h, d = args.text_tokens + args.image_tokens, args.heads, args.head_dim
    record: dict = {"shape": [h, s, d], "kept": args.kept, "gpu": torch.cuda.get_device_name(), "forms": {}}
    table = forms()
    # correctness, batch 2, several masks; then a length that is no multiple of the 128-key block (the last block
    # runs bounds-masked)
    q2, k2, v2 = (torch.randn(2, s, h, d, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    for mask_name, keep in _masks(2, args.text_tokens, args.image_tokens, args.kept, dev).items():
        _check_forms(table, record, mask_name, q2, k2, v2, keep)
    qo, ko, vo = (torch.randn(3, 1000, h, d, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    odd = torch.ones(3, 1000, dtype=torch.bool, device=dev)
    odd[0, 40:128] = False
    odd[1, 777:] = False
    odd[2, 1::3] = False
    _check_forms(table, record, "length_1000", qo, ko, vo, odd)
    # timing, batch 1, the prefix mask
    q, k, v = (torch.randn(1, s, h, d, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    keep = _masks(1, args.text_tokens, args.image_tokens, args.kept, dev)["prefix"]
    from flash_attn.cute import flash_attn_func

    kept_rows = keep[0].nonzero().squeeze(1)
    kc, vc = (x.transpose(1, 2).index_select(1, kept_rows).contiguous() for x in (k, v))
    timings = {"fa4_kept_keys_floor": lambda: flash_attn_func(q.transpose(1, 2), kc, vc)}
    timings.update({name: (lambda fn=fn: fn(q, k, v, keep)) for name, fn in table.items()})
    for name, fn in timings.items():
        try:
            ms = graphed_ms(fn)
            record["forms"].setdefault(name, {})["ms"] = ms
            print(f"time {name:20s} {ms:.4f} ms", flush=True)
        except Exception as e:  # noqa: BLE001
            record["forms"].setdefault(name, {})["ms"] = f"error {type(e).__name__}: {str(e)[:200]}"
            print(f"time {name:20s} error {type(e).__name__}: {str(e)[:300]}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
