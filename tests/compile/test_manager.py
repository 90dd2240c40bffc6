"""The pass manager: tiers, counters, and the whole pipeline of passes on tiny FLUX and Wan graphs."""

from __future__ import annotations

import pytest
import torch

from diffc.compile import CompileCounters, PassManager
from diffc.compile.passes import FUSION_PASSES, graph_targets
from diffc.errors import InvalidArgumentError
from tests.compile.common import EXPECTED, GRAPH_ONLY, GRAPH_TOL, OPT_IN, UNGATED_PAIRS, save_and_load
from tests.compile.conftest import MODELS
from tests.compile.test_qk_norm_rope import CALLS as QK_CALLS
from tests.helpers import rel_err

# Nodes the cast canonicalisation removes in the float32 tiny graphs: every
# ``_assert_tensor_metadata`` and every float32 -> float32 ``to`` / ``type_as``.
CANONICALIZED = {"flux": 68, "wan": 94}  # pinned; test_canonicalize.py checks what they are


@pytest.mark.parametrize("model", MODELS)
def test_fast_tier_runs_every_pass(traced, model):
    t = traced(model)
    counters = PassManager().run(t.program)
    assert counters == CompileCounters(
        graphs_rewritten=1,
        passes_run=1 + len(FUSION_PASSES) - len(OPT_IN),
        passes_skipped=0,
        matches={"canonicalize_casts": CANONICALIZED[model],
                 **{k: v for k, v in EXPECTED[model].items() if k not in OPT_IN}},
    )
    targets = graph_targets(t.program.graph_module)
    entered = {k: v for k, v in targets.items() if k.startswith("diffc.")}
    qk_op = "per_head" if model == "flux" else "across_heads"
    op_of = {"rms_norm_kernel": "rms_norm", "split_cat_linear": "linear_accumulate"}  # where a pass's op has another name
    ops = {f"diffc.{op_of.get(name, name)}.default": n for name, n in EXPECTED[model].items()
           if name != "qk_norm_rope" and name not in GRAPH_ONLY and name not in OPT_IN and n}
    pairs = EXPECTED[model]["gated_residual_adaln"]  # each took one adaln_modulate and, unless ungated, one
    ops["diffc.gated_residual.default"] -= pairs - UNGATED_PAIRS[model]  # gated_residual
    ops["diffc.adaln_modulate.default"] -= pairs
    ops = {k: v for k, v in ops.items() if v}
    assert entered == {**ops, f"diffc.qk_norm_rope_{qk_op}.default": QK_CALLS[model]}
    assert rel_err(t.run(), t.unfused) < GRAPH_TOL[torch.float32]


@pytest.mark.parametrize("model", MODELS)
def test_lossless_tier_is_bit_exact(traced, model):
    t = traced(model)
    counters = PassManager(tier="lossless").run(t.program)
    assert counters == CompileCounters(
        graphs_rewritten=1,
        passes_run=1,
        passes_skipped=len(FUSION_PASSES) - len(OPT_IN),
        matches={"canonicalize_casts": CANONICALIZED[model]},
    )
    assert not any(k.startswith("diffc.") for k in graph_targets(t.program.graph_module))
    assert torch.equal(t.run(), t.unfused)


def test_counters_accumulate_over_graphs(traced):
    manager = PassManager()
    manager.run(traced("flux").program)
    manager.run(traced("wan").program.graph_module)
    assert manager.counters.graphs_rewritten == 2
    both = EXPECTED["flux"]["adaln_modulate"] + EXPECTED["wan"]["adaln_modulate"]
    assert manager.counters.matches["adaln_modulate"] == both


def test_rewritten_program_saves_and_loads(traced, tmp_path):
    """The rewritten ExportedProgram stays serialisable (the later artifact's unit), diffc ops included."""
    t = traced("flux")
    PassManager().run(t.program)
    loaded, module = save_and_load(t.program, tmp_path)
    assert graph_targets(loaded.graph_module) == graph_targets(t.program.graph_module)
    with torch.no_grad():
        assert torch.equal(module(**t.inputs), t.run())


def test_unknown_tier():
    with pytest.raises(InvalidArgumentError, match=r"tier: expected one of lossless, fast, fp8, got 'int4'"):
        PassManager(tier="int4")
