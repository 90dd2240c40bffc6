"""diffc::attention_key_padding and diffc::attention_fa4_key_mask (attention under a boolean mask that only
drops keys) against the masked ``scaled_dot_product_attention`` they replace, the device-side compaction of the
kept keys the second one runs FlashAttention-4 on, and the pass that lowers such nodes onto the first."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffc.errors import InvalidArgumentError
from diffc.ops.attention_fa4 import fa4_unavailable
from diffc.ops.attention_key_padding import compact_keys, kept_keys, key_padding_ref

B, H, S, D = 2, 3, 24, 8


def _qkv(seed: int, dtype=torch.float32, device="cpu", b=B, s=S):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, H, D, generator=g).to(device, dtype).transpose(1, 2) for _ in range(3)]  # DiT layout


def _prefix(lengths, s=S, device="cpu"):
    return (torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]).to(device)[:, None, None, :]


def _text_first(lengths, text=6, s=S):
    """Qwen-Image's joint mask: the prompt's tokens first (padding at its end), then every image token."""
    mask = _prefix(lengths, s)
    mask[..., text:] = True
    return mask


# name -> (mask, what the op reads from it: per element a prefix length or the kept indices; None where an
# element keeps no key and the op runs the masked attention itself)
MASKS = {
    "two lengths": (_prefix([20, 13]), [20, 13]),
    "one length": (_prefix([17, 17]), [17, 17]),
    "nothing dropped": (_prefix([S, S]), [S, S]),
    "broadcast over the batch": (_prefix([9]), [9, 9]),
    "text first": (_text_first([4, 6]), [[0, 1, 2, 3, *range(6, S)], 6 + (S - 6)]),
    "a hole": (_prefix([20, 13]).clone().index_fill_(-1, torch.tensor([3]), False),
               [[0, 1, 2, *range(4, 20)], [0, 1, 2, *range(4, 13)]]),
    "a row with no key": (_prefix([20, 0]), None),
}


def _read(keys):
    if keys is None:
        return None
    return [k.stop if isinstance(k, slice) and k.start == 0 else k.tolist() for k in keys]


@pytest.mark.parametrize("name", MASKS)
def test_equals_the_masked_attention(name):
    mask, expected = MASKS[name]
    q, k, v = _qkv(0)
    assert _read(kept_keys(mask, B)) == expected
    for scale in (None, 0.3):
        out = torch.ops.diffc.attention_key_padding(q, k, v, mask, scale)
        ref = key_padding_ref(q, k, v, mask, scale)
        assert out.shape == ref.shape and out.transpose(1, 2).is_contiguous()  # a (B, H, S, D) view of BSHD
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5, equal_nan=True)


def _attend_compacted(q, k, v, mask, scale=None):
    """What attention_fa4_key_mask asks of FA4, in torch: per batch element, unmasked attention over the first
    ``used`` rows of the compacted keys (zeros where it keeps none)."""
    kc, vc, used = compact_keys(k, v, mask)
    out = torch.zeros_like(q)
    for b, n in enumerate(used.tolist()):
        if n:
            kb, vb = (x[b:b + 1, :n].transpose(1, 2) for x in (kc, vc))
            out[b:b + 1] = F.scaled_dot_product_attention(q[b:b + 1], kb, vb, scale=scale)
    return out


@pytest.mark.parametrize("name", MASKS)
def test_compaction_puts_the_kept_keys_first(name):
    """compact_keys (on the device, no host read): each element's kept keys first, in order, and their count;
    attention over that many of them is the masked attention (zeros for an element that keeps none, as torch's)."""
    mask, _ = MASKS[name]
    q, k, v = _qkv(5)
    v = torch.randn(B, S + 3, H, D)[:, 3:].transpose(1, 2)  # the tail of a longer (joint) buffer, as DiTs slice it
    kc, vc, used = compact_keys(k, v, mask)
    keep = mask.reshape(mask.shape[0], S).expand(B, S)
    assert used.dtype == torch.int32 and used.tolist() == keep.sum(1).tolist()
    for b in range(B):
        n = int(used[b])
        assert kc.shape == (B, S, H, D) and kc.is_contiguous()
        assert torch.equal(kc[b, :n], k.transpose(1, 2)[b][keep[b]]) and torch.equal(vc[b, :n], v.transpose(1, 2)[b][keep[b]])
        assert torch.equal(kc[b, n:], k.transpose(1, 2)[b][~keep[b]])  # the dropped ones after, never read
    for scale in (None, 0.3):
        torch.testing.assert_close(_attend_compacted(q, k, v, mask, scale), key_padding_ref(q, k, v, mask, scale),
                                   atol=2e-6, rtol=1e-5)


def test_key_mask_op_without_fa4_runs_the_masked_attention():
    q, k, v = _qkv(6)
    mask = _text_first([4, 6])
    out = torch.ops.diffc.attention_fa4_key_mask(q, k, v, mask, 0.5)
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, key_padding_ref(q, k, v, mask, 0.5), atol=2e-6, rtol=1e-5)
    with pytest.raises(InvalidArgumentError, match=r"^mask: expected a boolean key mask"):
        torch.ops.diffc.attention_fa4_key_mask(q, k, v, torch.zeros(B, 1, 1, S), None)


@pytest.mark.parametrize("op", ["attention_key_padding", "attention_fa4_key_mask"])
def test_opcheck(op):
    q, k, v = _qkv(1)
    torch.library.opcheck(getattr(torch.ops.diffc, op).default, (q, k, v, _prefix([20, 13]), None))


def test_bad_arguments_name_the_field():
    q, k, v = _qkv(2)
    op = torch.ops.diffc.attention_key_padding
    with pytest.raises(InvalidArgumentError, match=r"^mask: expected a boolean key mask of shape \(2 or 1, 1, 1, 24\)"):
        op(q, k, v, torch.ones(B, 1, S, S, dtype=torch.bool), None)
    with pytest.raises(InvalidArgumentError, match=r"^mask: expected a boolean key mask"):
        op(q, k, v, torch.zeros(B, 1, 1, S), None)
    with pytest.raises(InvalidArgumentError, match=r"^k: expected shape"):
        op(q, k[:, :2], v, _prefix([S, S]), None)
    with pytest.raises(InvalidArgumentError, match=r"mask"):
        op(q, k, v, _prefix([S, S]).to("meta"), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_the_gpu():
    q, k, v = _qkv(3, torch.bfloat16, "cuda", b=2, s=1024)
    mask = _prefix([1000, 777], s=1024, device="cuda")
    out = torch.ops.diffc.attention_key_padding(q, k, v, mask, None)
    ref = key_padding_ref(q.float(), k.float(), v.float(), mask).to(torch.bfloat16)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available() or fa4_unavailable() is not None,
                    reason=f"needs flash-attn-4 on a Hopper/Blackwell GPU ({fa4_unavailable()})")
def test_fa4_key_mask_on_the_gpu_and_in_a_cuda_graph():
    """FA4 over the compacted keys against the masked SDPA in float32, an element keeping no key included; then
    captured in a CUDA graph and replayed after the mask changed in place (no host read to go stale)."""
    from diffc.capture import capture

    q, k, v = _qkv(7, torch.bfloat16, "cuda", b=3, s=1000)
    mask = torch.ones(3, 1, 1, 1000, dtype=torch.bool, device="cuda")
    mask[0, ..., 40:128] = False  # Qwen-Image's: the prompt's padding between its tokens and the image's
    mask[1, ..., 777:] = False
    mask[2] = False

    def check(out):
        ref = key_padding_ref(q.float(), k.float(), v.float(), mask).to(torch.bfloat16)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)

    check(torch.ops.diffc.attention_fa4_key_mask(q, k, v, mask, None))
    graph, out = capture(lambda: torch.ops.diffc.attention_fa4_key_mask(q, k, v, mask, None), torch.device("cuda"))
    mask.copy_(torch.rand(mask.shape, device="cuda") < 0.3)
    graph.replay()
    torch.cuda.synchronize()
    check(out)


# ---- the pass ---------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _lowered(mask):
    from diffc.compile.compiler import compile_module

    q, k, v = _qkv(4)
    _program, report, graph = compile_module(_Attention(), {"q": q, "k": k, "v": v, "mask": mask},
                                             device=torch.device("cpu"), dtype=torch.float32, attention="sdpa")
    return report


@pytest.fixture
def any_length(monkeypatch):
    from diffc.compile.passes import key_padding

    monkeypatch.setattr(key_padding, "MIN_KEYS", S)


def test_short_sequences_keep_the_masked_attention():
    """Below MIN_KEYS keys the per-call mask read and the lost CUDA graphs cost more than the masked kernel."""
    assert _lowered(_prefix([20, 13])).matches["key_padding_attention"] == 0


@pytest.mark.usefixtures("any_length")
@pytest.mark.parametrize("mask, taken", [
    (_prefix([20, 13]), 1),
    (_prefix([9]), 1),  # broadcast over the batch
    (torch.ones(B, 1, S, S, dtype=torch.bool).tril(), 0),  # varies over queries: not a key mask
    (torch.zeros(B, 1, 1, S), 0),  # an additive float mask
])
def test_the_pass_takes_boolean_key_masks_only(mask, taken):
    report = _lowered(mask)
    assert report.matches["key_padding_attention"] == taken
    assert report.fused_ops.get("diffc.attention_key_padding.default", 0) == taken
    assert report.rel_err_vs_eager < 1e-5
