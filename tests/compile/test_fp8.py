"""The fp8 tier on tiny native FLUX and Wan DiTs (bf16): the weight transform, the lowering of (fused producer ->
linear) onto fp8 producers + ``_scaled_mm``, exact site counts, the bf16 sites and why, and the quality report.

Tiny sizes whose linear layers ``_scaled_mm`` accepts (multiples of 16): FLUX "tiny" (dim 32, FFN 128; FLUX.1-dev:
dim 3072, FFN 12288); Wan "tiny" widened to 2 heads of 16 and FFN 64 (Wan2.1-1.3B: dim 1536, FFN 8960).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffc.compile.pipeline import compile_dit
from diffc.errors import InvalidArgumentError
from diffc.models.wan.transformer import WAN_TRANSFORMER_SPECS, WanTransformer3DModel
from diffc.ops.fp8 import FP8
from diffc.runtime.fp8 import SCALE, WEIGHT, Fp8Weights, check_scheme
from tests.compile.conftest import _cast_like_loader, _wan_inputs, build
from tests.fp8_interpreter import round_interpreter_fp8_to_nearest

round_interpreter_fp8_to_nearest()
CPU, BF16 = torch.device("cpu"), torch.bfloat16
MIN_PSNR_DB = 30.0

# Lowered linears per block, and the ones kept in bf16 (no fused kernel produces their input).
EXPECTED = {
    "flux": {
        "transformer_blocks": (
            {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"},
            {"attn.to_out.0", "attn.to_add_out", "norm1.linear", "norm1_context.linear"}),
        "single_transformer_blocks": (
            {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"}, {"proj_out", "norm.linear"}),
    },
    "wan": {
        # attn2.to_q reads norm2, an affine LayerNorm fused with the attention residual before it
        "blocks": ({"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "ffn.net.0.proj", "ffn.net.2"},
                   {"attn1.to_out.0", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"}),
    },
}


def _model(name: str):
    if name == "flux":
        return build("flux", BF16)
    torch.manual_seed(0)
    config = dataclasses.replace(WAN_TRANSFORMER_SPECS["tiny"], attention_head_dim=16, ffn_dim=64)
    return _cast_like_loader(WanTransformer3DModel(config).eval(), BF16), _wan_inputs(BF16)


@dataclasses.dataclass
class Compiled:
    net: torch.nn.Module
    inputs: dict
    transform: Fp8Weights
    report: object
    graphs: dict
    eager: torch.Tensor
    compiled: torch.Tensor


@pytest.fixture(scope="module", params=["flux", "wan"])
def compiled(request) -> Compiled:
    net, inputs = _model(request.param)
    with torch.no_grad():
        eager = net(**inputs)
    transform = Fp8Weights(net).apply()
    graphs: dict = {}
    report = compile_dit(net, inputs, graphs=graphs, device=CPU, dtype=BF16, tier="fp8")
    from diffc.compile.pipeline import _installed
    from diffc.compile.regions import dit_regions

    with _installed(dit_regions(net), graphs), torch.no_grad():
        out = net(**inputs)
    out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
    eager = eager[0] if isinstance(eager, tuple) else getattr(eager, "sample", eager)
    return Compiled(net, inputs, transform, report, graphs, eager, out)


def _psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    mse = float(((out - ref) ** 2).mean())
    return 10 * torch.log10(torch.tensor(float(ref.abs().max()) ** 2 / max(mse, 1e-20))).item()


def _model_name(c: Compiled) -> str:
    return "flux" if "transformer_blocks" in c.graphs else "wan"


def test_weight_transform_adds_per_channel_fp8_copies(compiled):
    c = compiled
    for name, linear in c.transform.linears.items():
        w8, scale = getattr(linear, WEIGHT), getattr(linear, SCALE)
        assert w8.dtype == FP8 and w8.shape == linear.weight.shape and scale.shape == (1, linear.out_features)
        assert linear.weight.dtype == BF16  # the checkpoint's weight stays
    described = c.transform.describe()
    assert described["kind"] == "fp8" and described["linears"] == len(c.transform.linears) > 0
    assert described["bytes"] == sum(m.weight.numel() + 4 * m.out_features for m in c.transform.linears.values())


def test_lowering_sites_are_exact(compiled):
    c = compiled
    expected = EXPECTED[_model_name(c)]
    for region in c.report.regions:
        lowered, kept = expected[region.region]
        assert region.matches["fp8_linear"] == len(lowered)
        assert {k.removesuffix(".weight") for k in region.fp8["rel_err"]} == lowered
        assert {k.removesuffix(".weight") for k in region.fp8["kept_bf16"]} == kept
        (graph,) = c.graphs[region.region].values()
        ops = {}
        for node in graph.program.graph_module.graph.nodes:
            if node.op == "call_function":
                ops[str(node.target)] = ops.get(str(node.target), 0) + 1
        assert ops.get("aten._scaled_mm.default", 0) == len(lowered)
        assert all(mm.args[7] is True for mm in _scaled_mms(graph.program.graph_module))  # use_fast_accum
        assert ops.get("aten.linear.default", 0) == len(kept)
        fp8_producers = sum(n for k, n in ops.items() if k.startswith("diffc.") and k.endswith("_fp8.default")
                            and "qk_norm_rope" not in k and "attention" not in k)
        assert fp8_producers == region.fp8["producers_fp8"] > 0


def test_attention_outputs_stay_bf16_with_the_reason(compiled):
    reasons = {f"{r.region}.{k}": v for r in compiled.report.regions for k, v in r.fp8["kept_bf16"].items()}
    outs = [k for k in reasons if "to_out" in k or "to_add_out" in k]
    assert outs and all("attention output" in reasons[k] for k in outs)


def test_compiled_fp8_is_close_to_bf16_eager(compiled):
    c = compiled
    assert c.compiled.shape == c.eager.shape
    assert _psnr(c.compiled, c.eager) >= MIN_PSNR_DB
    assert 0 < c.report.rel_err_vs_eager < 0.05  # per forward, vs bf16 eager on the compile inputs
    for region in c.report.regions:
        errs = region.fp8["rel_err"].values()
        assert all(0 < e < 0.1 for e in errs) and region.fp8["max_rel_err"] == max(errs)


def test_lora_style_in_place_writes_requantize(compiled):
    c = compiled
    name, linear = next(iter(c.transform.linears.items()))
    before, before_scale = getattr(linear, WEIGHT).clone(), getattr(linear, SCALE).clone()
    old = linear.weight.detach().clone()
    address = getattr(linear, WEIGHT).data_ptr()
    try:
        with torch.no_grad():
            linear.weight.mul_(2)
        c.transform.weights_written([f"{name}.weight"])
        assert getattr(linear, WEIGHT).data_ptr() == address  # in place: graphs keep their inputs
        torch.testing.assert_close(getattr(linear, SCALE), 2 * before_scale)
        assert torch.equal(getattr(linear, WEIGHT).float(), before.float())  # same fp8 codes, doubled scale
        assert c.transform.requantized == 1
    finally:
        with torch.no_grad():
            linear.weight.copy_(old)
        c.transform.weights_written([f"{name}.weight"])


def _expected_unread(c: Compiled) -> set[str]:
    """The layers whose bf16 weight no graph reads: every lowered site of every block of its region."""
    out = set()
    for region in c.report.regions:
        blocks = len(getattr(c.net, region.region))
        out |= {f"{region.region}.{i}.{k.removesuffix('.weight')}" for i in range(blocks) for k in region.fp8["rel_err"]}
    return out


def test_graphs_read_no_bf16_weight_of_a_lowered_site(compiled):
    """What the runtime may keep off the device: the weights of the lowered sites, never a bf16 site's."""
    from diffc.runtime.fp8 import unread_linears

    c = compiled
    for region in c.report.regions:
        (graph,) = c.graphs[region.region].values()
        read = graph.read_state_names
        assert read < set(graph.state_names)  # the lowered sites' weights are still graph inputs, unread
        assert not read & set(region.fp8["rel_err"])
        assert set(region.fp8["kept_bf16"]) <= read
    unread = unread_linears(c.net, c.transform.linears, c.graphs)
    assert unread == _expected_unread(c) and unread
    first = c.report.regions[0].region  # a region without graphs runs eagerly: all of its weights are read
    others = {k: v for k, v in c.graphs.items() if k != first}
    assert unread_linears(c.net, c.transform.linears, others) == {n for n in unread if not n.startswith(first + ".")}


def _output(out):
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)


def test_released_layers_run_their_fp8_copy_eagerly_and_restore_exactly(compiled):
    """A released layer's bf16 weight goes to the host (here the same CPU); run eagerly (no graph for a shape),
    it computes with its fp8 copy multiplied out; compiled graphs give the same output as before; restoring
    brings back the exact weight and the plain forward."""
    from diffc.compile.pipeline import _installed
    from diffc.compile.regions import dit_regions

    c = compiled
    names = _expected_unread(c)
    originals = {n: c.transform.linears[n].weight.detach().clone() for n in names}
    with torch.no_grad():
        moved = c.transform.release(sorted(names), host="cpu")
        try:
            assert moved == sum(w.numel() * 2 for w in originals.values())
            assert c.transform.released == names and c.transform.describe()["originals_on_host"] == len(names)
            assert all("forward" in c.transform.linears[n].__dict__ for n in names)
            eager_fp8 = _output(c.net(**c.inputs))
            with _installed(dit_regions(c.net), c.graphs):
                assert torch.equal(_output(c.net(**c.inputs)), c.compiled)
        finally:
            c.transform.restore()
        assert not c.transform.released and not any("forward" in m.__dict__ for m in c.transform.linears.values())
        assert all(torch.equal(c.transform.linears[n].weight, w) for n, w in originals.items())
        assert torch.equal(_output(c.net(**c.inputs)), c.eager)
        try:  # the reference: the same layers' weights replaced by their fp8 copies multiplied out (the eager
            # forward multiplies the unscaled copy and scales the product: the same values, rounded elsewhere)
            for n in names:
                m = c.transform.linears[n]
                m.weight.copy_((getattr(m, WEIGHT).float() * getattr(m, SCALE).reshape(-1, 1)).to(BF16))
            want = _output(c.net(**c.inputs))
        finally:
            for n, w in originals.items():
                c.transform.linears[n].weight.copy_(w)
    assert _psnr(eager_fp8, want) >= 45.0 and not torch.equal(eager_fp8, c.eager)
    assert _psnr(eager_fp8, c.eager) >= MIN_PSNR_DB


def test_a_lora_merge_brings_its_layers_back_and_keeps_them():
    """A LoRA writes into the bf16 weights in place: the layers it touches come back from the host before the
    merge (and stay), are re-quantized from the merged weights, and unmerge bit for bit; the rest stay released."""
    from diffc.lora import LoraManager
    from diffc.ops.fp8 import quantize_weight
    from diffc.runtime.dit_stack import DiTStack
    from tests.lora import writers as W

    net, _ = _model("wan")
    stack = DiTStack("transformer", net, CPU)
    stack.set_weight_quantization("fp8")
    fp8 = stack._fp8()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    fp8.release(list(fp8.linears), host="cpu")
    touched = ["blocks.0.attn1.to_q", "blocks.1.ffn.net.2"]
    lora = W.random_lora(net, touched, seed=3)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = W.write_wan_original(lora, Path(tmp) / "wan.safetensors")
        manager = LoraManager({"transformer": stack})
        manager.set("style", path, strength=0.7)
    assert fp8.held == set(touched) and fp8.released == set(fp8.linears) - set(touched)
    for name in touched:
        m = fp8.linears[name]
        assert "forward" not in m.__dict__ and not torch.equal(m.weight, base[f"{name}.weight"])
        w8, scale = quantize_weight(m.weight)
        assert torch.equal(getattr(m, WEIGHT).float(), w8.float()) and torch.equal(getattr(m, SCALE), scale)
    assert fp8.release(touched) == 0  # held: a later release leaves them on the device
    manager.unmerge()
    assert all(torch.equal(v, base[k]) for k, v in net.state_dict().items())
    stack.set_weight_quantization(None)
    assert not fp8.released and not any("forward" in m.__dict__ for m in fp8.linears.values())


def test_layers_known_unread_at_load_are_released_as_they_are_quantized():
    net, _ = _model("wan")
    names = {n for n in Fp8Weights(net).linears if n.startswith("blocks.1.")}
    transform = Fp8Weights(net).apply(release=names)
    assert transform.released == names and names
    assert all(("forward" in m.__dict__) == (n in names) for n, m in transform.linears.items())
    transform.remove()
    assert not transform.released and not any("forward" in m.__dict__ for m in transform.linears.values())


def test_remove_takes_the_buffers_away():
    net, _ = _model("wan")
    transform = Fp8Weights(net).apply()
    assert any(k.endswith(WEIGHT) for k in net.state_dict())
    transform.remove()
    assert not any(WEIGHT in k for k in net.state_dict())


def test_bad_scheme_is_refused():
    with pytest.raises(InvalidArgumentError) as exc:
        check_scheme("int4")
    assert exc.value.field == "quality" and "accepted: fp8" in str(exc.value)


def test_fp8_keeps_gelu_in_diffcs_kernel_on_every_device():
    """On a GPU the ``fast`` tier moves bias + tanh-GELU into the GEMM's bf16 epilogue, which would leave the
    feed-forward's down-projection without a fused fp8 producer; the fp8 tier keeps diffc's kernel."""
    from diffc.compile.compiler import fusion_passes
    from diffc.compile.passes import GeluTanhPass
    from diffc.compile.passes.gelu_tanh import LinearBiasGeluEpilogue

    def gelu_patterns(tier):
        (gelu,) = [p for p in fusion_passes(tier) if isinstance(p, GeluTanhPass)]
        return [type(v) for v in gelu.patterns]

    assert LinearBiasGeluEpilogue in gelu_patterns("fast")
    assert LinearBiasGeluEpilogue not in gelu_patterns("fp8") and gelu_patterns("fp8")


def test_standalone_quantization_pays_only_for_large_gemms():
    """The cost model at production shapes: FLUX.1-dev 1024² (4,096 image + 512 text tokens), Wan2.1-1.3B."""
    from diffc.compile.fp8 import standalone_pays

    assert standalone_pays(4608, 15360, [3072])  # FLUX single block proj_out over its concatenation
    assert standalone_pays(4096, 3072, [3072])  # FLUX double block attn.to_out over the image tokens
    assert not standalone_pays(512, 3072, [3072])  # ... attn.to_add_out over the text tokens
    assert not standalone_pays(1, 3072, [18432])  # a modulation MLP (one row per batch item)
    assert not standalone_pays(4096, 64, [64])  # tiny layers: the launch costs more than fp8 saves


def _compile(name: str, batch: int | None = None, **options):
    net, inputs = _model(name)
    if batch is not None:  # the first ``batch`` items of every batched input (FLUX's position ids have none)
        inputs = {k: v[:batch] if k not in ("img_ids", "txt_ids") else v for k, v in inputs.items()}
    with torch.no_grad():
        eager = net(**inputs)
    Fp8Weights(net).apply()
    graphs: dict = {}
    report = compile_dit(net, inputs, graphs=graphs, device=CPU, dtype=BF16, tier="fp8", **options)
    from diffc.compile.pipeline import _installed
    from diffc.compile.regions import dit_regions

    with _installed(dit_regions(net), graphs), torch.no_grad():
        out = net(**inputs)
    unwrap = lambda o: o[0] if isinstance(o, tuple) else getattr(o, "sample", o)  # noqa: E731
    return report, graphs, unwrap(out), unwrap(eager)


# quantizations read from a concatenation's two parts per region (diffc.quantize_rows_cat)
EXPECTED_CONCAT = {"flux": {"transformer_blocks": 0, "single_transformer_blocks": 1}, "wan": {"blocks": 0}}


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_standalone_quantization_lowers_the_unfused_linears(monkeypatch, name):
    """Where the cost model says it pays (forced here: tiny shapes never pay), each linear whose input no fused
    kernel quantizes reads ``diffc.quantize_rows`` of it; ``--disable fp8_quantize_rows`` keeps them bf16."""
    import diffc.compile.fp8 as lowering

    monkeypatch.setattr(lowering, "standalone_pays", lambda rows, k, outs, in_bytes=2: True)
    report, graphs, out, eager = _compile(name)
    cats = {}
    for region in report.regions:
        lowered, kept = EXPECTED[name][region.region]
        assert {k.removesuffix(".weight") for k in region.fp8["rel_err"]} == lowered | kept
        assert region.fp8["kept_bf16"] == {} and region.fp8["quantized_standalone"] > 0
        (graph,) = graphs[region.region].values()
        targets = [str(n.target) for n in graph.program.graph_module.graph.nodes if n.op == "call_function"]
        concat = EXPECTED_CONCAT[name][region.region]  # FLUX's single block: proj_out reads cat([attn, mlp])
        assert region.fp8["quantized_concat"] == concat and region.fp8["quantized_concat_gelu"] == concat
        assert targets.count("diffc.quantize_rows_cat_gelu.default") == concat  # its MLP's GELU folded in
        assert targets.count("diffc.gelu_tanh.default") == 0
        cats[region.region] = targets.count("aten.cat.default")
        assert targets.count("diffc.quantize_rows.default") == region.fp8["quantized_standalone"] - concat
        assert targets.count("aten._scaled_mm.default") == len(lowered | kept)
        assert "aten.linear.default" not in targets
        assert all(0 < e < 0.1 for e in region.fp8["rel_err"].values())
    assert _psnr(out, eager) >= MIN_PSNR_DB

    report, graphs, out, _ = _compile(name, disable=("fp8_quantize_concat",))  # the concatenation written, then read
    for region in report.regions:
        (graph,) = graphs[region.region].values()
        targets = [str(n.target) for n in graph.program.graph_module.graph.nodes if n.op == "call_function"]
        assert region.fp8["quantized_concat"] == 0 and "diffc.quantize_rows_cat.default" not in targets
        assert targets.count("aten.cat.default") == cats[region.region] + EXPECTED_CONCAT[name][region.region]
    assert _psnr(out, eager) >= MIN_PSNR_DB

    report, _, _, _ = _compile(name, disable=("fp8_quantize_rows",))
    for region in report.regions:
        lowered, kept = EXPECTED[name][region.region]
        assert region.fp8["quantized_standalone"] == 0
        assert {k.removesuffix(".weight") for k in region.fp8["kept_bf16"]} == kept


# Attention sites on fp8 attention (q/k from the fused QK-norm + RoPE kernel) and the ones kept bf16.
EXPECTED_ATTENTION = {"flux": {"transformer_blocks": 1, "single_transformer_blocks": 1},
                      "wan": {"blocks": 1}}
# What quantizes v: FLUX's double-stream blocks concatenate text and image values, which quantize_heads_cat reads
# where they are (the concatenation goes); a single-stream block's v is one projection's
V_QUANTIZER = {"flux": {"transformer_blocks": "diffc.quantize_heads_cat.default",
                        "single_transformer_blocks": "diffc.quantize_heads.default"},
               "wan": {"blocks": "diffc.quantize_heads.default"}}


def test_self_attention_runs_fp8_with_its_error(compiled):
    """q and k are written in fp8 by the QK-norm + RoPE kernel (static scales from the norm weights), v is
    quantized per head, the attention runs ``diffc.attention_flashinfer_fp8`` (its reference on the CPU);
    Wan's cross-attention (q/k not from that kernel) stays bf16 with the reason."""
    name = _model_name(compiled)
    for region in compiled.report.regions:
        fp8 = region.fp8
        assert fp8["attention_fp8"] == EXPECTED_ATTENTION[name][region.region]
        assert len(fp8["attention_rel_err"]) == fp8["attention_fp8"]
        assert all(0 < e < 0.15 for e in fp8["attention_rel_err"].values()), fp8["attention_rel_err"]
        (graph,) = compiled.graphs[region.region].values()
        targets = [str(n.target) for n in graph.program.graph_module.graph.nodes if n.op == "call_function"]
        assert targets.count("diffc.attention_flashinfer_fp8.default") == fp8["attention_fp8"]
        quantizer = V_QUANTIZER[name][region.region]
        assert targets.count(quantizer) == fp8["attention_fp8"]
        assert sum(t.startswith("diffc.quantize_heads") for t in targets) == fp8["attention_fp8"]
        if quantizer.endswith("_cat.default"):
            cats = [n for n in graph.program.graph_module.graph.nodes if str(n.target) == "aten.cat.default"]
            assert not any(n.meta["val"].ndim == 4 for n in cats), cats  # the values' concatenation is gone
        assert not any(t.startswith("diffc.qk_norm_rope") and not t.endswith("_fp8.default") for t in targets)
        assert region.matches["fp8_attention"] == fp8["attention_fp8"]
    if name == "wan":
        (region,) = compiled.report.regions
        (reason,) = region.fp8["attention_bf16"].values()
        assert "not written by the fused QK-norm + RoPE kernel" in reason
        assert "attn2" in next(iter(region.fp8["attention_bf16"]))


def test_graph_scales_come_from_the_norm_weights(compiled):
    """One ``diffc.qk_fp8_head_scales`` per fp8 attention reads the q/k norm weights its QK-norm kernels use (both
    writers' for FLUX's joint text + image buffer, which share the larger scale)."""
    for region in compiled.report.regions:
        (graph,) = compiled.graphs[region.region].values()
        nodes = list(graph.program.graph_module.graph.nodes)
        scales = [n for n in nodes if n.op == "call_function" and str(n.target) == "diffc.qk_fp8_head_scales.default"]
        writers = [n for n in nodes if n.op == "call_function" and str(n.target).startswith("diffc.qk_norm_rope")]
        assert len(scales) == region.fp8["attention_fp8"]
        weights = {a.name for n in scales for a in n.args[:4] if a is not None}
        assert weights == {w.args[i].name for w in writers for i in (2, 3)}
        q_scale, k_scale = scales[0].args[-2:]
        assert all(q_scale in w.args and k_scale in w.args for w in writers)


def test_fp8_attention_can_be_left_out_or_unavailable(monkeypatch):
    """``--disable fp8_attention`` keeps bf16 attention; so does a device without the fp8 kernel, with the reason."""
    report, graphs, out, eager = _compile("wan", disable=("fp8_attention",))
    (region,) = report.regions
    assert region.fp8["attention_fp8"] == 0 and region.fp8["attention_bf16"] == {}
    assert _psnr(out, eager) >= MIN_PSNR_DB
    import diffc.compile.fp8_attention as fa

    monkeypatch.setattr(fa, "fp8_attention_unavailable", lambda device: "flashinfer cannot be imported (test)")
    report, graphs, out, eager = _compile("flux")
    for region in report.regions:
        assert region.fp8["attention_fp8"] == 0
        assert set(region.fp8["attention_bf16"].values()) == {"flashinfer cannot be imported (test)"}
        (graph,) = graphs[region.region].values()
        targets = {str(n.target) for n in graph.program.graph_module.graph.nodes if n.op == "call_function"}
        assert "diffc.attention_flashinfer_fp8.default" not in targets


def test_head_dims_flashinfer_lacks_stay_bf16(traced, monkeypatch):
    """On a GPU the lowering keeps attention whose head_dim has no FA3 fp8 kernel (the tiny models' 12) in bf16."""
    import diffc.compile.fp8_attention as fa
    from diffc.compile.compiler import fusion_passes
    from diffc.compile.fp8 import start_lowering
    from diffc.compile.manager import PassManager

    t = traced("wan", BF16)
    PassManager(passes=fusion_passes("fp8"), tier="fp8").run(t.program)
    monkeypatch.setattr(fa, "fp8_attention_unavailable", lambda device: None)  # as on an H200 with flashinfer
    lowering = start_lowering(t.program)
    assert fa.Fp8AttentionPass(torch.device("cuda"))(t.program, lowering) == 0
    assert any("head_dim 12" in why for why in lowering.attention_kept.values()), lowering.attention_kept


def test_loading_where_the_fp8_attention_kernel_is_missing_warns(compiled):
    """An artifact whose graphs call flashinfer's fp8 kernel, loaded on a GPU without it: the loader says which
    op runs its (slower) reference and why; on the CPU, where the references are the plan, it says nothing."""
    import warnings

    from diffc.runtime.artifacts import _warn_unavailable, unavailable_kernels

    graphs = [g for by_key in compiled.graphs.values() for g in by_key.values()]
    missing = unavailable_kernels(graphs, "cuda")  # this machine has no GPU: "no CUDA GPU"
    assert set(missing) == {"diffc.attention_flashinfer_fp8.default"} and all(missing.values())
    with pytest.warns(UserWarning, match=r"attention_flashinfer_fp8.*cannot run here"):
        _warn_unavailable(graphs, "cuda", "flux-fp8.diffc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_unavailable(graphs, "cpu", "flux-fp8.diffc")


@pytest.mark.parametrize("tier", ["fast", "fp8"])
def test_per_token_modulation_table_is_added_in_the_kernels(tier):
    """Wan2.2 TI2V's per-token timesteps: ``scale_shift_table + temb.float()`` is not materialised; the fused ops
    read temb's chunks and add the table's rows (bit-exact against the materialising graph)."""
    net, inputs = _model("wan")
    inputs = {**inputs, "timestep": inputs["timestep"][:, None].expand(2, 12).contiguous()}  # one per token
    with torch.no_grad():
        eager = net(**inputs)
    if tier == "fp8":
        Fp8Weights(net).apply()
    outs = []
    for disable in ((), ("modulation_table",)):
        graphs: dict = {}
        report = compile_dit(net, inputs, graphs=graphs, device=CPU, dtype=BF16, tier=tier, disable=disable)
        from diffc.compile.pipeline import _installed
        from diffc.compile.regions import dit_regions

        with _installed(dit_regions(net), graphs), torch.no_grad():
            outs.append(net(**inputs))
        (region,) = report.regions
        (graph,) = graphs["blocks"].values()
        nodes = [n for n in graph.program.graph_module.graph.nodes if n.op == "call_function"]
        biased = [n for n in nodes if any(k.endswith("_bias") and v is not None for k, v in n.kwargs.items())]
        table_adds = [n for n in nodes if str(n.target) == "aten.add.Tensor"
                      and any(getattr(a, "name", "") == "p_scale_shift_table" for a in n.args)]
        if disable:
            assert "modulation_table" not in region.matches and not biased and len(table_adds) == 1
        else:
            assert region.matches["modulation_table"] == 1 and len(biased) == 4 and not table_adds
    unwrap = lambda o: o[0] if isinstance(o, tuple) else getattr(o, "sample", o)  # noqa: E731
    fused, materialised = (unwrap(o) for o in outs)
    assert torch.equal(fused, materialised)
    assert _psnr(fused, unwrap(eager)) >= MIN_PSNR_DB


# the one-row linears per region (diffc.gemv at batch 1): FLUX's adaptive norms' projections of the conditioning
GEMV_SITES = {"transformer_blocks": {"norm1.linear.weight", "norm1_context.linear.weight"},
              "single_transformer_blocks": {"norm.linear.weight"}}


@pytest.mark.parametrize("disable", [(), ("fp8_gemv",)], ids=["fp8-weights", "fp8_gemv-disabled"])
def test_one_row_linears_read_the_fp8_weights(disable):
    """At batch 1 the modulation projections run diffc.gemv on the fp8 weight copies (weight-only fp8), with their
    errors in the report; ``--disable fp8_gemv`` keeps the bf16 weights and says so."""
    report, graphs, out, eager = _compile("flux", batch=1, disable=disable)
    for region in report.regions:
        sites = GEMV_SITES[region.region]
        (graph,) = graphs[region.region].values()
        gemvs = [n for n in graph.program.graph_module.graph.nodes if n.target == torch.ops.diffc.gemv.default]
        assert len(gemvs) == len(sites)
        weights = {n.args[1].name for n in gemvs}
        if disable:
            assert region.fp8["gemv_fp8"] == 0 and all(n.args[2] is None for n in gemvs)
            assert all(w.startswith("p_") for w in weights)
            assert {k: region.fp8["kept_bf16"][k] for k in sites} == {
                k: "a one-row linear (diffc.gemv) and fp8_gemv is disabled" for k in sites}
            assert not sites & set(region.fp8["rel_err"])
        else:
            assert region.fp8["gemv_fp8"] == len(sites) and all(w.endswith("_weight_fp8") for w in weights)
            assert all(n.args[2].name.endswith("_weight_fp8_scale") for n in gemvs)
            errors = {k: region.fp8["rel_err"][k] for k in sites}
            assert all(0 < e < 0.05 for e in errors.values()), errors
            assert not sites & set(region.fp8["kept_bf16"])
    assert _psnr(out, eager) >= MIN_PSNR_DB


def _one_linear(monkeypatch):
    """A one-linear module with fp8 weight copies, its input, and the ExportedProgram of it (every standalone
    quantization paying, so the lone linear is lowered)."""
    import diffc.compile.fp8 as lowering
    from diffc.compile.trace import trace_module
    from diffc.ops.fp8 import quantize_weight

    monkeypatch.setattr(lowering, "standalone_pays", lambda rows, k, outs, in_bytes=2: True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 48)).to(BF16).eval()  # the layer is "0", its buffers "0.weight_fp8"
    with torch.no_grad():
        net[0].bias.fill_(4.0)  # large against the product: a dropped bias cannot hide in the fp8 error
    w8, scale = quantize_weight(net[0].weight)
    net[0].register_buffer(WEIGHT, w8)
    net[0].register_buffer(SCALE, scale)
    x = torch.randn(6, 32).to(BF16)
    return net, x, trace_module(net, {"input": x})


def _scaled_mms(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target == torch.ops.aten._scaled_mm.default]


def test_a_bias_given_by_keyword_stays_in_the_fp8_gemm(monkeypatch):
    """The lowering reads a linear's bias whether the graph passes it by position or by keyword."""
    from diffc.compile.fp8 import Fp8LinearPass

    net, x, program = _one_linear(monkeypatch)
    (linear,) = [n for n in program.graph_module.graph.nodes if n.target == torch.ops.aten.linear.default]
    bias = linear.args[2]
    linear.args, linear.kwargs = linear.args[:2], {"bias": bias}
    program.graph_module.recompile()
    result = Fp8LinearPass()(program)
    assert list(result.sites) == ["0.weight"] and result.standalone == 1
    (mm,) = _scaled_mms(program.graph_module)
    assert mm.args[4] is bias
    with torch.no_grad():
        out = program.module()(input=x)
    ref = net(x).float()
    assert float((out.float() - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize("disable", [(), ("fp8_fast_accum",)], ids=["fast-accum", "fp8_fast_accum-disabled"])
def test_fp8_gemms_accumulate_fast_unless_disabled(monkeypatch, disable):
    """The fp8 GEMMs pass ``use_fast_accum`` (Hopper's fp8 MMA sums without promoting to float32 every few
    k-steps: 0.67-0.96x the time at the DiTs' shapes, ``bench/results/ops/h100-2026-12-08-fp8-fast-accum.txt``);
    ``--disable fp8_fast_accum`` keeps the plain accumulation. Both through the compiler, as ``diffc compile`` asks."""
    from diffc.compile.compiler import compile_module

    net, x, _ = _one_linear(monkeypatch)
    program, report, graph = compile_module(net, {"input": x}, device=CPU, dtype=BF16, tier="fp8", disable=disable)
    mms = _scaled_mms(program.graph_module)
    assert len(mms) == 1 and report.matches["fp8_linear"] == 1
    assert mms[0].args[7] is (not disable)
    with torch.no_grad():
        out = graph(input=x)
    ref = net(x).float()
    assert float((out.float() - ref).norm() / ref.norm()) < 0.05
