"""The text encoders' masked attention on SDPA's fused kernels (diffc.runtime.encoders.ContiguousMasks): which SDPA
calls get a contiguous mask, and T5 / UMT5 encoders through the mode (tests/runtime/test_encoder_attention_gpu.py
on a GPU, where transformers 5.17's strided position bias sent them to torch's math path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from diffc.runtime.encoders import ContiguousMasks, EncoderGraphs, strided_mask
from diffc.runtime.executor import Executor
from diffc.runtime.options import RuntimeOptions

CPU = torch.device("cpu")


class MaskSpy(TorchFunctionMode):
    """Records the mask of every SDPA call it sees (outside :class:`ContiguousMasks`: it sees the rewritten call)."""

    def __init__(self):
        super().__init__()
        self.masks: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.masks.append(args[3] if len(args) > 3 else kwargs.get("attn_mask"))
        return func(*args, **kwargs)


def _qkv(b=2, h=3, s=5, d=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, s, d, generator=g) for _ in range(3)]


def permuted_bias(h=3, s=5) -> torch.Tensor:
    """A (1, heads, q, k) bias with the heads innermost, as transformers 5.17's T5 builds its position bias."""
    return torch.randn(s, s, h, generator=torch.Generator().manual_seed(1)).permute(2, 0, 1).unsqueeze(0)


def test_strided_float_masks_are_copied_and_nothing_else():
    q, k, v = _qkv()
    bias = permuted_bias()
    assert bias.stride(-1) != 1
    keys = torch.randn(1, 3, 5, 1).expand(1, 3, 5, 5)  # one value a query, broadcast over the keys (stride 0)
    for args, kwargs in (((q, k, v, bias), {"scale": 1.0}), ((q, k, v), {"attn_mask": bias, "dropout_p": 0.0}),
                         ((q, k, v, keys), {})):
        new_args, new_kwargs = strided_mask(args, kwargs)
        mask = new_args[3] if len(new_args) > 3 else new_kwargs["attn_mask"]
        assert mask.is_contiguous() and torch.equal(mask, args[3] if len(args) > 3 else kwargs["attn_mask"])
        assert new_args[:3] == args[:3] and {k: v for k, v in new_kwargs.items() if k != "attn_mask"} == \
            {k: v for k, v in kwargs.items() if k != "attn_mask"}
    left = {
        "no mask": ((q, k, v), {}),
        "a None mask": ((q, k, v), {"attn_mask": None}),
        "a contiguous mask": ((q, k, v, bias.contiguous()), {}),
        "a strided bool mask (SDPA's own concern)": ((q, k, v, bias > 0), {}),
        "a mask over one key": ((q, k, v, torch.randn(5, 1, 3).permute(2, 0, 1)), {}),
    }
    for why, (args, kwargs) in left.items():
        assert strided_mask(args, kwargs) is None, why


def test_the_mode_hands_sdpa_the_contiguous_mask():
    q, k, v = _qkv()
    bias = permuted_bias()
    spy = MaskSpy()
    with spy, ContiguousMasks():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert spy.masks[0].is_contiguous() and torch.equal(spy.masks[0], bias) and spy.masks[1] is None
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias.contiguous(), scale=1.0))


@pytest.mark.parametrize("inference", [False, True], ids=["normal", "inference-mode"])
def test_a_mask_read_again_reuses_its_copy_until_it_changes(inference):
    """T5 hands one position bias object to every layer: one copy serves them; another tensor (a view of the same
    memory too) or another mask is copied anew, and so is the same one written in place in between (where torch
    counts versions: not for inference tensors, which the pipelines' encodes make)."""
    with torch.inference_mode(inference):
        q, k, v = _qkv()
        bias = permuted_bias()
        other = permuted_bias() + 1
        spy = MaskSpy()
        with spy, ContiguousMasks():
            for mask in (bias, bias, bias[:, :, :, :], other, bias):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            if not inference:
                bias.mul_(2)  # in place: the version moves
                F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    first, same, view, second, again, *changed = spy.masks
    assert same is first and view is not first and second is not view and again is not second
    for got, want in ((first, bias / (1 if inference else 2)), (view, first), (second, other), (again, first)):
        assert got.is_contiguous() and torch.equal(got, want)
    if changed:
        assert changed[0] is not again and torch.equal(changed[0], bias)


def _encoder(cls, config_cls, dtype=torch.float32):
    torch.manual_seed(1)
    config = config_cls(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                        feed_forward_proj="gated-gelu", decoder_start_token_id=0, is_encoder_decoder=False)
    return cls(config).to(dtype).eval().requires_grad_(False)


@pytest.mark.parametrize("cls,config_cls", [(T5EncoderModel, T5Config), (UMT5EncoderModel, UMT5Config)],
                         ids=["t5", "umt5"])
def test_t5_family_encoders_run_under_the_mode(cls, config_cls):
    """A T5 / UMT5 encoder (FLUX.1's, SD3's; Wan's), with and without a padding mask: under the switch every mask
    SDPA reads has a unit last stride and the output is SDPA's with those masks (here the same as without: the
    installed transformers may build contiguous masks already); off again, no hook is left."""
    encoder = _encoder(cls, config_cls)
    components = {"text_encoder": encoder}
    graphs = EncoderGraphs(components, ("text_encoder",), CPU, cuda_graphs=False)
    ids = torch.randint(1, 64, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.inference_mode():
        for kwargs in ({}, {"attention_mask": mask}):
            ref = encoder(ids, **kwargs).last_hidden_state
            graphs.set_fused_attention(True)
            assert graphs.fused_attention and graphs.describe()["text_encoder"]["fused_attention"]
            spy = MaskSpy()
            with spy:
                out = components["text_encoder"](ids, **kwargs).last_hidden_state
            assert len(spy.masks) == encoder.config.num_layers
            assert all(m is None or m.stride(-1) == 1 for m in spy.masks)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            graphs.set_fused_attention(False)
            assert not graphs.fused_attention
    assert not encoder._forward_pre_hooks and not encoder._forward_hooks


@pytest.mark.parametrize("cls,config_cls,copies", [(T5EncoderModel, T5Config, 1), (UMT5EncoderModel, UMT5Config, 3)],
                         ids=["t5", "umt5"])
def test_strided_position_biases_reach_sdpa_contiguous(cls, config_cls, copies, monkeypatch):
    """transformers 5.17 handed SDPA the position bias as T5's ``compute_bias`` makes it, a permuted view (later
    releases copy it): emulated here. Under the switch, in inference mode as the pipelines encode, every mask SDPA
    reads is contiguous, T5's one bias is copied once a forward (UMT5's, one a layer, once each), and the output is
    the strided call's."""
    from transformers.integrations import sdpa_attention

    if not hasattr(sdpa_attention, "create_position_bias_mask"):
        pytest.skip("this transformers builds T5's SDPA mask elsewhere")

    def as_517(position_bias, attention_mask, is_causal, query, key):
        return position_bias if attention_mask is None else position_bias + attention_mask

    monkeypatch.setattr(sdpa_attention, "create_position_bias_mask", as_517)
    encoder = _encoder(cls, config_cls)
    graphs = EncoderGraphs({"text_encoder": encoder}, ("text_encoder",), CPU, cuda_graphs=False)
    ids = torch.randint(1, 64, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        spy = MaskSpy()
        with spy:
            ref = encoder(ids).last_hidden_state
        assert all(m.stride(-1) != 1 for m in spy.masks)  # what reached SDPA before
        graphs.set_fused_attention(True)
        spy = MaskSpy()
        with spy:
            out = encoder(ids).last_hidden_state
    assert len(spy.masks) == 3 and all(m.is_contiguous() for m in spy.masks)
    assert len({id(m) for m in spy.masks}) == copies
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_failing_forward_leaves_no_mode_behind():
    """The mode is held by forward hooks; the closing one runs when the forward raises too."""
    from torch.overrides import _get_current_function_mode_stack

    encoder = _encoder(T5EncoderModel, T5Config)
    graphs = EncoderGraphs({"text_encoder": encoder}, ("text_encoder",), CPU, cuda_graphs=False)
    graphs.set_fused_attention(True)
    with pytest.raises(Exception):
        encoder(torch.full((1, 3), 1000))  # token ids past the vocabulary
    assert not _get_current_function_mode_stack()


def test_install_compiled_on_a_cpu_leaves_the_encoders_as_they_are():
    """The executor switches the mode on with a compiled DiT on a GPU only (as the fused VAE)."""
    executor = Executor({"text_encoder": _encoder(T5EncoderModel, T5Config)}, CPU, RuntimeOptions(), ("text_encoder",))
    executor.install_compiled({})
    assert not executor.encoders.fused_attention
