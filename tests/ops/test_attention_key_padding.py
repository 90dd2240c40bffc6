"""diffc::attention_key_padding (attention under a boolean mask that only drops keys) against the masked
``scaled_dot_product_attention`` it replaces, and the pass that lowers such nodes onto it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffc.errors import InvalidArgumentError
from diffc.ops.attention_key_padding import kept_keys, key_padding_ref

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


def test_opcheck():
    q, k, v = _qkv(1)
    torch.library.opcheck(torch.ops.diffc.attention_key_padding.default, (q, k, v, _prefix([20, 13]), None))


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
