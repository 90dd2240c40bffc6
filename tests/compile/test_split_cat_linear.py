"""Projecting a feature concatenation as one GEMM per input (FLUX's single-block ``proj_out``), and the
``diffc::linear_accumulate`` op it enters, against torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffc.compile import PassManager
from diffc.compile.compiler import fusion_passes
from diffc.compile.passes import graph_targets
from diffc.compile.passes.split_cat_linear import SplitCatLinearPass
from diffc.errors import InvalidArgumentError
from diffc.ops.linear_accumulate import linear_accumulate, linear_accumulate_ref
from tests.compile.common import EXPECTED, GRAPH_TOL, check_pass, save_and_load
from tests.compile.conftest import DTYPES, MODELS
from tests.helpers import rel_err

OP, CAT, LINEAR = "diffc.linear_accumulate.default", "aten.cat.default", "aten.linear.default"
# On its own the pass also splits FLUX's timestep and guidance embedders' first linear over [cos, sin] in float32
# (in bf16 a cast stands between), which the timestep_embedding pass fuses before it in a compile (EXPECTED
# counts what is left then).
EMBEDDERS = {"flux": 2, "wan": 0}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_single_blocks_project_without_the_concatenation(traced, model, dtype):
    t = traced(model, dtype)
    n = EXPECTED[model]["split_cat_linear"] + (EMBEDDERS[model] if dtype == torch.float32 else 0)
    # each site: its cat goes, its linear stays (on the first input), one accumulation each: [attention, MLP],
    # [cos, sin]; numerics against the unfused graph
    check_pass(t, SplitCatLinearPass(), n, dtype, left={CAT: n, LINEAR: 0}, entered=OP)
    gm = t.program.graph_module
    assert not any(node.target == torch.ops.aten.linear.default and node.args[0].target == torch.ops.aten.cat.default
                   for node in gm.graph.nodes if node.op == "call_function" and isinstance(node.args[0], torch.fx.Node))
    assert SplitCatLinearPass()(gm) == 0


def test_after_the_default_passes_and_through_save_and_load(traced, tmp_path):
    """With every default pass first (the MLP half then comes from the GELU op), as a compile runs it; the program
    keeps serialising."""
    t = traced("flux")
    manager = PassManager(fusion_passes("fast"))
    counters = manager.run(t.program)
    assert counters.matches["split_cat_linear"] == EXPECTED["flux"]["split_cat_linear"]
    assert rel_err(t.run(), t.unfused) < GRAPH_TOL[torch.float32]
    loaded, module = save_and_load(t.program, tmp_path)
    assert graph_targets(loaded.graph_module)[OP] == EXPECTED["flux"]["split_cat_linear"]
    with torch.no_grad():
        assert torch.equal(module(**t.inputs), t.run())


def test_on_by_default_except_under_lossless_fp8_or_disable(traced):
    assert "split_cat_linear" in [p.name for p in fusion_passes("fast")]
    assert "split_cat_linear" not in [p.name for p in fusion_passes("fast", disable=("split_cat_linear",))]
    counters = PassManager(fusion_passes("fp8"), tier="fp8").run(traced("flux").program)
    assert "split_cat_linear" not in counters.matches  # the fp8 tier's quantizing concatenation takes the site
    with pytest.raises(InvalidArgumentError) as err:
        fusion_passes("fp8", enable=("split_cat_linear",))
    assert err.value.field == "enable" and "--quality fast" in str(err.value)
    t = traced("flux")
    counters = PassManager([SplitCatLinearPass()], tier="fp8").run(t.program)
    assert counters.matches.get("split_cat_linear", 0) == 0 and counters.passes_skipped == 1
    counters = PassManager([SplitCatLinearPass()], tier="lossless").run(traced("flux").program)
    assert counters.matches.get("split_cat_linear", 0) == 0  # not bit-exact


def test_leaves_other_concatenations_alone():
    """A concatenation along another dimension, one read twice, or inputs of another dtype keep their GEMM."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(12, 5)
            self.rows = torch.nn.Linear(4, 5)

        def forward(self, a, b, c):
            joint = torch.cat([a, b], -1)
            seq = self.rows(torch.cat([c, c], 1))  # along the sequence
            twice = self.proj(joint) + joint.sum()  # the concatenation has a second reader
            return twice.sum() + seq.sum()

    a, b, c = torch.randn(2, 3, 4), torch.randn(2, 3, 8), torch.randn(2, 3, 4)
    program = torch.export.export(Net().eval(), (a, b, c))
    assert SplitCatLinearPass()(program.graph_module) == 0


SHAPES = [((3, 7), 5, (0, 7)), ((2, 4, 16), 9, (16, 32)), ((1, 33, 24), 40, (8, 32))]  # x, N, weight column range


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_shape,n,cols", SHAPES)
def test_op_matches_torch(x_shape, n, cols, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*x_shape, generator=g).to(dtype)
    full = torch.randn(n, cols[1] + 3, generator=g).to(dtype)
    weight = full[:, cols[0]:cols[1]]  # a column slice: not contiguous, unit last stride
    out = torch.randn(*x_shape[:-1], n, generator=g).to(dtype)
    expected = linear_accumulate_ref(x, weight, out)
    start = out.clone()
    assert linear_accumulate(x, weight, out) is out
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, expected) < tol
    assert rel_err(out, start + F.linear(x, weight)) < tol


def test_split_equals_the_concatenated_projection():
    g = torch.Generator().manual_seed(4)
    a, m = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 20, generator=g)
    w, b = torch.randn(5, 28, generator=g), torch.randn(5, generator=g)
    out = F.linear(a, w[:, :8], b)
    linear_accumulate(m, w[:, 8:], out)
    assert rel_err(out, F.linear(torch.cat([a, m], -1), w, b)) < 1e-6


@pytest.mark.parametrize("field,args", [
    ("weight", (torch.randn(2, 4), torch.randn(3, 5), torch.zeros(2, 3))),
    ("weight", (torch.randn(2, 4), torch.randn(4, 3).t(), torch.zeros(2, 3))),
    ("weight", (torch.randn(2, 4), torch.randn(3, 4, dtype=torch.float64), torch.zeros(2, 3))),
    ("out", (torch.randn(2, 4), torch.randn(3, 4), torch.zeros(3, 2).t())),
    ("out", (torch.randn(2, 4), torch.randn(3, 4), torch.zeros(2, 4))),
    ("x", (torch.randn(4), torch.randn(3, 4), torch.zeros(3))),
    ("x", (torch.ones(2, 4, dtype=torch.int32), torch.randn(3, 4), torch.zeros(2, 3))),
])
def test_op_names_a_bad_argument(field, args):
    with pytest.raises(InvalidArgumentError) as err:
        torch.ops.diffc.linear_accumulate(*args)
    assert err.value.field == field


def test_compiled_artifact_with_the_pass_runs_a_fresh_pipeline(flux_checkpoint, tmp_path):
    """A default compile end to end: the single blocks' projections are split, the artifact loads in another
    pipeline, no block falls back, and the image is eager's."""
    import json

    import numpy as np

    import diffc
    from tests.helpers import psnr_uint8

    path = flux_checkpoint("dev-tiny")
    request = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=8, seed=2, progress=False)
    eager = np.asarray(diffc.load(path).generate("a kite", **request).images[0])
    pipe = diffc.load(path)
    report = pipe.compile([{"height": 32, "width": 32, "max_sequence_length": 8}], out=str(tmp_path / "art"),
                          log=lambda line: None)
    regions = {r.region: r.matches["split_cat_linear"] for r in report.buckets[0].regions}
    assert regions == {"transformer_blocks": 0, "single_transformer_blocks": 1}
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["passes"]["disabled"] == []
    fresh = diffc.load(path, compiled=str(tmp_path / "art"))
    out = np.asarray(fresh.generate("a kite", **request).images[0])
    counters = fresh.executor.compiled().counters
    assert counters.compiled_calls == 2 and counters.eager_fallbacks == 0
    assert eager.std() > 1.0 and psnr_uint8(out, eager) >= 40.0
