"""Attention lowering on tiny FLUX and Wan graphs (counts, numerics, save/load) and backend selection on CPU."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from diffc.compile import PassManager, default_passes
from diffc.compile.attention_select import (
    BACKENDS,
    REL_TOL,
    AttentionBackend,
    AttentionShape,
    CandidateResult,
    _choose,
    select_attention_backend,
)
from diffc.compile.passes import CanonicalizeCasts, graph_targets
from diffc.compile.passes.attention import (
    AttentionLoweringPass,
    attention_shapes,
    lower_node,
)
from diffc.errors import InvalidArgumentError
from tests.compile.common import FLUX_BLOCKS, FLUX_SINGLE, GRAPH_TOL, WAN_BLOCKS, save_and_load
from tests.compile.conftest import DTYPES, MODELS
from tests.helpers import rel_err

SDPA = "aten.scaled_dot_product_attention.default"
FLASH_CPU = "aten._scaled_dot_product_flash_attention_for_cpu.default"
# One joint attention per FLUX block; Wan: self- and cross-attention per block.
CALLS = {"flux": FLUX_BLOCKS + FLUX_SINGLE, "wan": 2 * WAN_BLOCKS}
SHAPES = {  # (B, H, S_q, S_kv, D): FLUX 5 text + 6 image tokens; Wan 12 video tokens, 5 text tokens
    "flux": [AttentionShape(2, 2, 11, 11, 16)],
    "wan": [AttentionShape(2, 2, 12, 12, 12), AttentionShape(2, 2, 12, 5, 12)],
}
SDPA_OP = torch.ops.aten.scaled_dot_product_attention.default
CUDA_BACKENDS = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
FAST = {"warmup": 1, "iters": 3}


def _lower(t, backends):
    gm = t.program.graph_module
    CanonicalizeCasts()(gm)
    before = graph_targets(gm)
    fusion = AttentionLoweringPass(backends)
    return fusion, fusion(gm), before, graph_targets(gm)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_lowers_every_site(traced, model, dtype):
    t = traced(model, dtype)
    assert attention_shapes(t.program.graph_module) == SHAPES[model]
    fusion, n, before, after = _lower(t, "sdpa_flash_cpu")
    assert n == CALLS[model] == before[SDPA]
    assert SDPA not in after and after[FLASH_CPU] == n
    assert after["<built-in function getitem>"] - before.get("<built-in function getitem>", 0) == n
    assert fusion.report.lowered == {"sdpa_flash_cpu": n} and fusion.report.refused == {} and not fusion.bit_exact
    out = t.run()
    assert out.dtype == t.unfused.dtype and rel_err(out, t.unfused) < GRAPH_TOL[dtype]
    assert torch.equal(out, t.unfused)  # torch's CPU dispatcher runs this very kernel


def _ops(gm) -> dict[str, int]:
    """Op counts without getitems (loading adds one for every output of a multi-output op)."""
    return {k: n for k, n in graph_targets(gm).items() if "getitem" not in k}


@pytest.mark.parametrize("model", MODELS)
def test_lowered_program_saves_and_loads(traced, model, tmp_path):
    t = traced(model, torch.bfloat16)
    _lower(t, "sdpa_flash_cpu")
    loaded, module = save_and_load(t.program, tmp_path)
    assert _ops(loaded.graph_module) == _ops(t.program.graph_module)
    with torch.no_grad():
        assert torch.equal(module(**t.inputs), t.run())


# torch.export's serializer before torch 2.13 has none of these: a graph value of one cannot be written
UNWRITABLE = {torch.uint16, torch.uint32, torch.uint64}


@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_cuda_kernels_serialize(traced, name, tmp_path):
    """The CUDA ops' schemas and fake outputs (SymInt max_q/max_k included) survive save/load; not run here.
    No value of the lowered graph has a dtype older torch cannot write (aten's flash op returns a uint64
    RNG state, so ``sdpa_flash`` lowers onto diffc's op returning the output alone)."""
    t = traced("flux", torch.bfloat16)
    gm = t.program.graph_module
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == SDPA]
    for node in nodes:
        out = lower_node(gm, node, BACKENDS[name])
        assert tuple(out.meta["val"].shape) == (2, 2, 11, 16)
    gm.recompile()
    dtypes = {v.dtype for n in gm.graph.nodes for v in torch.utils._pytree.tree_leaves(n.meta.get("val"))
              if isinstance(v, torch.Tensor)}
    assert not dtypes & UNWRITABLE, dtypes
    targets = graph_targets(save_and_load(t.program, tmp_path)[0].graph_module)
    assert targets[str(BACKENDS[name].op)] == len(nodes) and SDPA not in targets


class _Variants(torch.nn.Module):
    def forward(self, q, k, v, mask):
        plain = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        dropped = F.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
        return plain, masked, causal, dropped


def test_refuses_mask_causal_dropout():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=g) for _ in range(3))
    mask = torch.randn(7, 7, generator=g)
    program = torch.export.export(_Variants(), (q, k, v, mask))
    fusion = AttentionLoweringPass("sdpa_flash_cpu")
    assert fusion(program.graph_module) == 1
    assert fusion.report.refused == {"attn_mask": 1, "is_causal": 1, "dropout": 1}
    assert graph_targets(program.graph_module)[SDPA] == 3
    with torch.no_grad():
        plain = program.module()(q, k, v, mask)[0]
    assert torch.equal(plain, F.scaled_dot_product_attention(q, k, v, scale=0.3))  # the scale reached the kernel


def test_plan_by_shape_lowers_only_named_shapes(traced):
    self_attn, _cross = SHAPES["wan"]
    fusion, n, _before, after = _lower(traced("wan"), {self_attn: "sdpa_flash_cpu"})
    assert n == WAN_BLOCKS and after[SDPA] == WAN_BLOCKS and after[FLASH_CPU] == WAN_BLOCKS
    assert fusion.report.kept == WAN_BLOCKS


def test_bit_exact_follows_the_plan(traced):
    assert AttentionLoweringPass().bit_exact and not AttentionLoweringPass("sdpa_flash_cpu").bit_exact
    choice = select_attention_backend(SHAPES["flux"], "cpu", torch.float32, ["sdpa_flash_cpu"], **FAST)
    assert choice.shapes[0].torch_default == "sdpa_flash_cpu" and choice.bit_exact
    t = traced("flux")
    counters = PassManager(passes=[AttentionLoweringPass(choice)], tier="lossless").run(t.program)
    assert counters.matches["attention"] == CALLS["flux"] and counters.passes_skipped == 0
    assert PassManager(passes=[AttentionLoweringPass("sdpa_flash_cpu")], tier="lossless").run(
        traced("flux").program).passes_skipped == 1
    assert torch.equal(t.run(), t.unfused)


def test_choice_for_another_dtype_lowers_nothing(traced):
    choice = select_attention_backend(SHAPES["flux"], "cpu", torch.bfloat16, ["sdpa_flash_cpu"], **FAST)
    fusion, n, _before, _after = _lower(traced("flux", torch.float32), choice)
    assert n == 0 and fusion.report.kept == CALLS["flux"]


def test_select_on_cpu_reports_every_candidate():
    names = ["sdpa", "sdpa_flash_cpu", *CUDA_BACKENDS, "fa4", "flashinfer"]
    shapes = [*SHAPES["wan"], SHAPES["wan"][0]]
    choice = select_attention_backend(shapes, "cpu", torch.bfloat16, names, **FAST)
    assert [s.shape for s in choice.shapes] == SHAPES["wan"]
    for s in choice.shapes:
        assert s.backend in ("sdpa", "sdpa_flash_cpu") and s.torch_default == "sdpa_flash_cpu"
        for name in ("sdpa", "sdpa_flash_cpu"):
            r = s.candidates[name]
            assert r.status == "ok" and r.median_ms > 0 and r.rel_err < REL_TOL[torch.bfloat16]
        for name in (*CUDA_BACKENDS, "fa4", "flashinfer"):
            assert s.candidates[name].status == "unavailable" and "CUDA" in s.candidates[name].reason
    record = json.loads(json.dumps(choice.to_dict()))
    assert record["dtype"] == "bfloat16" and record["device"] == "cpu" and len(record["shapes"]) == 2
    assert record["shapes"][1]["shape"] == {"batch": 2, "heads": 2, "seq_q": 12, "seq_kv": 5, "head_dim": 12,
                                           "key_mask": False}


def _raise(q, k, v, scale):
    raise RuntimeError("no kernel for this head_dim")


def test_wrong_or_failing_backends_are_rejected():
    table = {
        **BACKENDS,
        # fast and wrong: causal where the model is not
        "causal": AttentionBackend("causal", "any", SDPA_OP, (None, 0.0, True)),
        "raises": AttentionBackend("raises", "any", adapter=_raise),
    }
    choice = select_attention_backend(SHAPES["flux"], "cpu", torch.float32, ["causal", "raises", "sdpa"],
                                      backends=table, **FAST)
    s = choice.shapes[0]
    assert s.backend == "sdpa"
    assert s.candidates["causal"].status == "wrong" and s.candidates["causal"].rel_err > 0.1
    assert "relative error" in s.candidates["causal"].reason
    assert s.candidates["raises"].status == "error" and s.candidates["raises"].reason == (
        "RuntimeError: no kernel for this head_dim")


def test_choice_rule_keeps_sdpa_within_margin():
    ok = lambda ms: CandidateResult("ok", median_ms=ms, rel_err=0.0)
    assert _choose({"sdpa": ok(1.0), "sdpa_flash_cpu": ok(0.99)}, BACKENDS, 0.02) == "sdpa"
    assert _choose({"sdpa": ok(1.0), "sdpa_flash_cpu": ok(0.9)}, BACKENDS, 0.02) == "sdpa_flash_cpu"
    assert _choose({"sdpa": ok(1.0), "fa4": ok(0.8), "flashinfer": ok(0.85)}, BACKENDS, 0.02) == "fa4"
    # at a shape whose calls take microseconds, a gain under MIN_GAIN_MS is noise however many percent it is
    assert _choose({"sdpa": ok(0.012), "sdpa_flash": ok(0.0115)}, BACKENDS, 0.02) == "sdpa"
    assert _choose({"sdpa": ok(0.012), "sdpa_flash": ok(0.0105)}, BACKENDS, 0.02) == "sdpa_flash"
    measured_only = {**BACKENDS, "eager": AttentionBackend("eager", "any", adapter=_raise)}
    assert _choose({"sdpa": ok(1.0), "eager": ok(0.1)}, measured_only, 0.02) == "sdpa"  # no op to lower onto
    assert _choose({"sdpa_flash": CandidateResult("wrong")}, BACKENDS, 0.02) == "sdpa"


def test_candidates_are_timed_in_interleaved_rounds(monkeypatch):
    """Each round times every candidate, in an order that reverses from round to round, and a candidate's time
    is the median of its rounds: a stall in one round (a GPU's clock dropping while one kernel is timed) does not
    decide the choice, and a candidate that raises while timed is an error, not a time."""
    from diffc.compile import attention_select as sel

    order = []
    scripted = {"sdpa": [1.0, 1.0, 1.0, 1.0, 1.0],
                "sdpa_flash_cpu": [1.2, 0.8, 0.8, 0.8, 0.8],  # stalled in its first round only
                "breaks": [0.9],  # faster than sdpa, until it raises in its second round
                "slow": [2.0]}  # out of the race after the first round (over 1.5x the fastest)

    def fake_median(fn, device, iters):
        name = fn.__name__
        order.append(name)
        if len(scripted[name]) <= sum(n == name for n in order) - 1:
            raise RuntimeError("lost the kernel")
        return scripted[name][sum(n == name for n in order) - 1]

    def named(name):
        def call():
            return None
        call.__name__ = name
        return call

    monkeypatch.setattr(sel, "_median_ms", fake_median)
    calls = {n: named(n) for n in scripted}
    results = {n: CandidateResult("ok", rel_err=0.0) for n in scripted}
    sel._time_interleaved(calls, results, torch.device("cpu"), warmup=1, iters=2, rounds=5)
    assert order[:7] == ["sdpa", "sdpa_flash_cpu", "breaks", "slow", "breaks", "sdpa_flash_cpu", "sdpa"]
    assert len(order) == 7 + 3 * 2
    assert results["sdpa_flash_cpu"].median_ms == 0.8 and results["sdpa_flash_cpu"].rounds_ms == [1.2] + [0.8] * 4
    assert results["sdpa"].median_ms == 1.0
    assert results["slow"].status == "ok" and results["slow"].median_ms == 2.0 and results["slow"].rounds_ms == [2.0]
    assert results["breaks"].status == "error" and results["breaks"].median_ms is None
    assert results["breaks"].reason == "RuntimeError: lost the kernel"
    table = {**BACKENDS, "breaks": BACKENDS["sdpa_flash_cpu"], "slow": BACKENDS["sdpa_flash_cpu"]}
    assert _choose(results, table, 0.02) == "sdpa_flash_cpu"


def test_select_records_each_timing_round():
    choice = select_attention_backend(SHAPES["flux"], "cpu", torch.float32, ["sdpa", "sdpa_flash_cpu"], **FAST)
    from diffc.compile.attention_select import TIMING_ROUNDS

    results = choice.shapes[0].candidates.values()
    for r in results:  # all rounds, or only the first for one left out of the race (CPU timings of tiny calls)
        # rounds_ms are recorded to 4 decimals, the median is not: a single round of 0.042699 ms is kept as 0.0427
        assert r.status == "ok" and len(r.rounds_ms) in (1, TIMING_ROUNDS) and min(r.rounds_ms) <= r.median_ms + 5e-5
    assert len(min(results, key=lambda r: r.rounds_ms[0]).rounds_ms) == TIMING_ROUNDS
    assert json.loads(json.dumps(choice.to_dict()))["shapes"][0]["candidates"]["sdpa"]["rounds_ms"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"shapes": []}, "shapes"),
        ({"shapes": [(2, 2, 11, 11, 16)]}, "shapes"),
        ({"candidates": ["sdpa", "flash3"]}, "candidates"),
        ({"candidates": []}, "candidates"),
        ({"dtype": torch.int8}, "dtype"),
        ({"device": "cuda"}, "device"),
        ({"device": "tpu"}, "device"),
        ({"iters": 0}, "iters"),
        ({"margin": 1.5}, "margin"),
    ],
)
def test_select_bad_input(kwargs, field):
    if field == "device" and kwargs["device"] == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = {"shapes": SHAPES["flux"], "device": "cpu", "dtype": torch.float32, **FAST, **kwargs}
    with pytest.raises(InvalidArgumentError) as e:
        select_attention_backend(**args)
    assert e.value.field == field


def test_pass_and_shape_bad_input():
    with pytest.raises(InvalidArgumentError, match="accepted: sdpa, sdpa_flash,") as e:
        AttentionLoweringPass("flash3")
    assert e.value.field == "backends"
    with pytest.raises(InvalidArgumentError, match="unknown backend 'eager'"):
        AttentionLoweringPass("eager")
    with pytest.raises(InvalidArgumentError, match="AttentionShape"):
        AttentionLoweringPass({(2, 2, 11, 11, 16): "sdpa_flash_cpu"})
    with pytest.raises(InvalidArgumentError) as e:
        AttentionShape(2, 0, 11, 11, 16)
    assert e.value.field == "shape.heads"


@pytest.mark.parametrize("model", MODELS)
def test_composes_with_the_fusion_passes(traced, model):
    """After every fusion pass, q and k come from diffc's fused QK-norm + RoPE buffers; still lowered."""
    t = traced(model, torch.bfloat16)
    counters = PassManager(passes=[*default_passes(), AttentionLoweringPass("sdpa_flash_cpu")]).run(t.program)
    assert counters.matches["attention"] == CALLS[model]
    assert rel_err(t.run(), t.unfused) < GRAPH_TOL[torch.bfloat16]


@pytest.mark.parametrize("name", ["fa4", "flashinfer", "sdpa_flash"])
def test_external_kernels_lower_onto_diffc_ops(traced, name):
    """FlashAttention-4, flashinfer and torch's flash kernel are diffc ops a graph can be lowered onto; without
    their library (or a GPU) each runs its SDPA reference, in the layout the library returns."""
    t = traced("flux", torch.float32)
    gm = t.program.graph_module
    from diffc.compile.passes.attention import lower_node

    lowered = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == SDPA_OP:  # the pass itself needs the kernel's GPU
            lower_node(gm, node, BACKENDS[name])
            lowered += 1
    gm.graph.lint()
    gm.recompile()
    assert lowered == CALLS["flux"]
    assert graph_targets(gm)[f"diffc.attention_{name}.default"] == CALLS["flux"]
    assert rel_err(t.run(), t.unfused) < 1e-5
    q, k, v = (torch.randn(2, 3, n, 8) for n in (5, 7, 7))
    torch.library.opcheck(getattr(torch.ops.diffc, f"attention_{name}").default, (q, k, v), {"scale": 0.5})


def _summary(choice, requested: str, applied: bool = True) -> dict:
    """``lower_attention``'s record of a choice (what the compile log reads)."""
    picked = ",".join(sorted(set(choice.backends.values())))
    return {"backend": picked, "requested": requested, "applied": applied,
            **json.loads(json.dumps(choice.to_dict()))}


def test_the_log_says_why_a_backend_asked_for_is_not_used():
    """``--attention NAME``: the compile log names why NAME runs none of a shape's attention, from the measured
    results: unavailable here, failing, or wrong; nothing when it was chosen or is the kernel torch runs anyway."""
    from diffc.compile.pipeline import _passed_over

    table = {**BACKENDS, "causal": AttentionBackend("causal", "any", SDPA_OP, (None, 0.0, True)),
             "raises": AttentionBackend("raises", "any", adapter=_raise)}
    for name, expected in (("fa4", "fa4 not used: unavailable: needs a CUDA device"),
                           ("raises", "raises not used: error: RuntimeError: no kernel for this head_dim"),
                           ("causal", "causal not used: wrong: relative error")):
        choice = select_attention_backend(SHAPES["flux"], "cpu", torch.float32, ["sdpa", name], backends=table,
                                          **FAST)
        assert expected in _passed_over(_summary(choice, name))
        assert _passed_over(_summary(choice, "auto")) == ""
    choice = select_attention_backend(SHAPES["flux"], "cpu", torch.float32, ["sdpa", "sdpa_flash_cpu"], **FAST)
    record = _summary(choice, "sdpa_flash_cpu")
    assert _passed_over(record) == ""  # chosen, or the node left to torch runs that very kernel
    shape = record["shapes"][0]
    shape.update(backend="sdpa", torch_default="math")
    shape["candidates"]["sdpa"]["median_ms"], shape["candidates"]["sdpa_flash_cpu"]["median_ms"] = 1.0, 0.99
    assert _passed_over(record) == " (sdpa_flash_cpu not used: 0.99 ms against sdpa's 1, not faster by the margin)"
    shape["backend"] = "sdpa_flash_cpu"
    lossless = {**_summary(choice, "sdpa_flash_cpu", applied=False), "backend": "sdpa_flash_cpu", "shapes": [shape]}
    assert _passed_over(lossless) == " (sdpa_flash_cpu not used: measured, not applied under --quality lossless)"


# ---- key-masked attention (a prompt padded to its length bucket) --------------------------------------------

KEY_MASKED = AttentionShape(2, 2, 12, 12, 8, key_mask=True)


class _KeyMasked(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v)


def _key_masked_inputs():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 12, 2, 8, generator=g).transpose(1, 2) for _ in range(3))
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[0, ..., 3:6] = False  # padding between the prompt's tokens and the image's
    mask[1, ..., 9:] = False
    return q, k, v, mask


@pytest.fixture
def fa4_anywhere(monkeypatch):
    """The fa4 backend as if available on the CPU (its ops then run their references, the masked SDPA)."""
    import dataclasses

    monkeypatch.setitem(BACKENDS, "fa4", dataclasses.replace(BACKENDS["fa4"], device_type="any", requires=None))


def test_key_masked_shapes_are_told_apart():
    program = torch.export.export(_KeyMasked(), _key_masked_inputs())
    assert attention_shapes(program.graph_module) == [KEY_MASKED, AttentionShape(2, 2, 12, 12, 8)]
    assert attention_shapes(program.graph_module, key_masks=False) == [AttentionShape(2, 2, 12, 12, 8)]
    assert KEY_MASKED.to_dict()["key_mask"] is True
    with pytest.raises(InvalidArgumentError) as e:
        AttentionShape(2, 2, 12, 12, 8, key_mask=1)
    assert e.value.field == "shape.key_mask"


@pytest.mark.usefixtures("fa4_anywhere")
@pytest.mark.parametrize("key_padded", [False, True])
def test_key_masked_calls_lower_onto_the_graph_safe_form(monkeypatch, key_padded):
    """A key-masked call planned onto fa4 becomes diffc.attention_fa4_key_mask (no host read: the graph keeps its
    CUDA graph), whether it is still an sdpa node or the key-padding pass made it diffc.attention_key_padding;
    planned sdpa, it is kept; the unmasked call follows its own shape's plan."""
    from diffc.compile.passes import KeyPaddingAttentionPass, key_padding
    from diffc.ops.registry import HOST_READS

    inputs = _key_masked_inputs()
    for plan, lowered in (({KEY_MASKED: "fa4"}, 1), ({KEY_MASKED: "sdpa"}, 0), ("fa4", 2)):
        program = torch.export.export(_KeyMasked(), inputs)
        gm = program.graph_module
        if key_padded:
            monkeypatch.setattr(key_padding, "MIN_KEYS", 1)
            assert KeyPaddingAttentionPass()(gm) == 1
        fusion = AttentionLoweringPass(plan)
        assert fusion(gm) == lowered and fusion.report.lowered == ({"fa4": lowered} if lowered else {})
        targets = graph_targets(gm)
        assert targets.get("diffc.attention_fa4_key_mask.default", 0) == (0 if plan == {KEY_MASKED: "sdpa"} else 1)
        if plan != {KEY_MASKED: "sdpa"}:
            assert not any(n.target in HOST_READS for n in gm.graph.nodes)
        with torch.no_grad():
            masked, plain = program.module()(*inputs)
        q, k, v, mask = inputs
        torch.testing.assert_close(masked, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        torch.testing.assert_close(plain, F.scaled_dot_product_attention(q, k, v))


def test_a_backend_without_a_key_mask_form_refuses_masked_sdpa_nodes():
    program = torch.export.export(_KeyMasked(), _key_masked_inputs())
    fusion = AttentionLoweringPass("sdpa_flash_cpu")
    assert fusion(program.graph_module) == 1 and fusion.report.refused == {"attn_mask": 1}


def test_selection_times_key_masked_shapes_with_a_key_mask():
    """Masked shapes: the masked sdpa and the backends with a key-mask form, checked against the masked
    reference (a kernel that ignores the mask is wrong); the others are unavailable for the shape."""
    from diffc.compile.attention_select import timing_mask

    ignores = lambda q, k, v, mask, scale: F.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
    table = {**BACKENDS,
             "keymask": AttentionBackend("keymask", "cpu", SDPA_OP, key_mask_op=torch.ops.diffc.attention_key_padding.default),
             "ignores": AttentionBackend("ignores", "cpu", SDPA_OP, key_mask_op=ignores)}
    shape = AttentionShape(3, 2, 40, 64, 8, key_mask=True)
    mask = timing_mask(shape, torch.device("cpu"))
    assert mask.shape == (3, 1, 1, 64) and mask.sum(-1).flatten().tolist() == [62, 62, 62]
    assert len({tuple(m.flatten().tolist()) for m in mask}) == 3  # each element drops its own keys
    choice = select_attention_backend([shape], "cpu", torch.float32, ["sdpa", "sdpa_flash_cpu", "keymask", "ignores"],
                                      backends=table, **FAST)
    c = choice.shapes[0].candidates
    assert c["sdpa"].status == "ok" and c["keymask"].status == "ok" and c["keymask"].rel_err < 1e-5
    assert c["ignores"].status == "wrong"
    assert c["sdpa_flash_cpu"].status == "unavailable" and c["sdpa_flash_cpu"].reason == "no key-mask form"
    assert choice.shapes[0].backend in ("sdpa", "keymask")


@pytest.mark.usefixtures("fa4_anywhere")
def test_disabling_the_key_mask_step_keeps_masked_calls_out_of_the_selection():
    """``--disable key_mask_attention``: key-masked calls are neither measured nor lowered (masked sdpa stays)."""
    from diffc.compile.compiler import compile_module

    q, k, v, mask = _key_masked_inputs()
    for disable, measured in (((), [KEY_MASKED, AttentionShape(2, 2, 12, 12, 8)]),
                              (("key_mask_attention",), [AttentionShape(2, 2, 12, 12, 8)])):
        _program, report, _graph = compile_module(_KeyMasked(), {"q": q, "k": k, "v": v, "mask": mask},
                                                  device=torch.device("cpu"), dtype=torch.float32, attention="fa4",
                                                  disable=disable)
        assert [AttentionShape(**s["shape"]) for s in report.attention["shapes"]] == measured
        assert report.rel_err_vs_eager < 1e-5
