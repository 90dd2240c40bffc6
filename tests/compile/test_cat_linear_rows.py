"""The value projections of a joint attention writing their rows of the concatenation (``cat_linear_rows``), and the
``diffc::linear_into`` op it enters, against torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffc.compile import PassManager
from diffc.compile.compiler import fusion_passes
from diffc.compile.passes import CatTransposedPass, graph_targets
from diffc.compile.passes.cat_linear_rows import CatLinearRowsPass
from diffc.errors import InvalidArgumentError
from diffc.ops.linear_into import linear_into
from tests.compile.common import EXPECTED, GRAPH_TOL, save_and_load
from tests.helpers import rel_err

OP, CAT = "diffc.linear_into.default", "aten.cat.default"


def test_flux_double_blocks_write_the_value_concatenation(traced, tmp_path):
    """After the default passes (cat_transposed leaves v's concatenation of the two projections): both GEMMs write
    one buffer, no concatenation is left, the numbers stay, and the program keeps serialising."""
    t = traced("flux")
    PassManager(fusion_passes("fast")).run(t.program)
    gm = t.program.graph_module
    before = graph_targets(gm)
    assert before[CAT] >= EXPECTED["flux"]["cat_linear_rows"]
    reference = t.run()
    assert CatLinearRowsPass()(gm) == EXPECTED["flux"]["cat_linear_rows"]
    after = graph_targets(gm)
    assert after[OP] == 2 * EXPECTED["flux"]["cat_linear_rows"]
    assert before[CAT] - after.get(CAT, 0) == EXPECTED["flux"]["cat_linear_rows"]
    assert before["aten.linear.default"] - after["aten.linear.default"] == 2 * EXPECTED["flux"]["cat_linear_rows"]
    assert rel_err(t.run(), reference) < GRAPH_TOL[torch.float32]
    assert CatLinearRowsPass()(gm) == 0
    loaded, module = save_and_load(t.program, tmp_path)
    assert graph_targets(loaded.graph_module)[OP] == after[OP]
    with torch.no_grad():
        assert torch.equal(module(**t.inputs), t.run())


def test_wan_has_no_site_and_the_pass_is_opt_in(traced):
    t = traced("wan")
    PassManager(fusion_passes("fast")).run(t.program)
    assert CatLinearRowsPass()(t.program.graph_module) == 0
    assert "cat_linear_rows" not in [p.name for p in fusion_passes("fast")]
    assert "cat_linear_rows" in [p.name for p in fusion_passes("fast", enable=("cat_linear_rows",))]
    with pytest.raises(InvalidArgumentError) as err:
        fusion_passes("fp8", enable=("cat_linear_rows",))
    assert err.value.field == "enable"
    counters = PassManager([CatLinearRowsPass()], tier="lossless").run(traced("flux").program)
    assert counters.matches.get("cat_linear_rows", 0) == 0  # not bit-exact


class _Joint(torch.nn.Module):
    def __init__(self, reread: bool = False, dim: int = 1, heads: bool = True):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(5, 8, bias=False)
        self.reread, self.dim, self.heads = reread, dim, heads

    def forward(self, x, y):
        va, vb = self.a(x), self.b(y)
        if self.heads:
            va, vb = va.unflatten(-1, (2, 4)), vb.unflatten(-1, (2, 4))
        v = torch.cat([va, vb], self.dim)
        return v * 2 + (va.sum() if self.reread else 0)


@pytest.mark.parametrize("heads", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_small_joint_values(heads, batch):
    torch.manual_seed(0)
    net = _Joint(heads=heads).eval()
    x, y = torch.randn(batch, 3, 6), torch.randn(batch, 4, 5)
    program = torch.export.export(net, (x, y))
    gm = program.graph_module
    CatTransposedPass()(gm)
    assert CatLinearRowsPass()(gm) == 1
    assert graph_targets(gm)[OP] == 2 and CAT not in graph_targets(gm)
    with torch.no_grad():
        _same_gemm(program.module()(x, y), net(x, y), rows_per_gemm=batch == 1)


def _same_gemm(got: torch.Tensor, want: torch.Tensor, rows_per_gemm: bool) -> None:
    """Bit for bit where the rewritten graph runs the very GEMM ``aten.linear`` runs (one over all rows); where
    it runs one GEMM a leading index, a CPU BLAS may pick another kernel for fewer rows (AVX-512 and AVX2
    machines differ): float32 rounding apart, never more (the GPU tests hold cuBLAS to bit equality)."""
    if rows_per_gemm:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("case", ["reread", "features"])
def test_leaves_other_concatenations_alone(case):
    net = _Joint(reread=case == "reread", dim=-1 if case == "features" else 1, heads=case != "features").eval()
    x, y = torch.randn(2, 3, 6), torch.randn(2, 3 if case == "features" else 4, 5)
    assert CatLinearRowsPass()(torch.export.export(net, (x, y)).graph_module) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,bias", [(1, True), (3, True), (2, False)])
def test_op_writes_its_rows_of_a_larger_buffer(batch, bias, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 7, 12, generator=g).to(dtype)
    w = torch.randn(9, 12, generator=g).to(dtype)
    b = torch.randn(9, generator=g).to(dtype) if bias else None
    joint = torch.full((batch, 11, 9), float("nan"), dtype=dtype)
    out = joint[:, 2:9]
    assert linear_into(x, w, b, out) is out
    assert torch.equal(out, F.linear(x, w, b))
    assert joint[:, :2].isnan().all() and joint[:, 9:].isnan().all()  # nothing outside its rows


def test_op_takes_more_leading_dimensions():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 4, 5, generator=g)
    w, b = torch.randn(6, 5, generator=g), torch.randn(6, generator=g)
    joint = torch.zeros(2, 3, 7, 6)
    linear_into(x, w, b, joint[:, :, 1:5])
    _same_gemm(joint[:, :, 1:5], F.linear(x, w, b), rows_per_gemm=False)
    assert not joint[:, :, :1].any() and not joint[:, :, 5:].any()


def test_opcheck():
    x, w, b = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(5)
    torch.library.opcheck(torch.ops.diffc.linear_into.default, (x, w, b, torch.empty(2, 3, 5)))


@pytest.mark.parametrize("field,args", [
    ("x", (torch.randn(4), torch.randn(3, 4), None, torch.empty(3))),
    ("weight", (torch.randn(2, 4), torch.randn(3, 5), None, torch.empty(2, 3))),
    ("weight", (torch.randn(2, 4), torch.randn(3, 4, dtype=torch.float64), None, torch.empty(2, 3))),
    ("bias", (torch.randn(2, 4), torch.randn(3, 4), torch.randn(4), torch.empty(2, 3))),
    ("out", (torch.randn(2, 4), torch.randn(3, 4), None, torch.empty(2, 4))),
    ("out", (torch.randn(2, 4), torch.randn(3, 4), None, torch.empty(3, 2).t())),
    ("out", (torch.randn(2, 4), torch.randn(3, 4), None, torch.empty(2, 3, dtype=torch.float64))),
])
def test_bad_arguments_name_the_field(field, args):
    with pytest.raises(InvalidArgumentError) as err:
        linear_into(*args)
    assert err.value.field == field


def test_qwen_image_blocks_write_their_values_too():
    """Qwen-Image's double-stream blocks (text and image values, joined for attention): one site a block."""
    from diffc.compile import trace_module
    from diffc.models.qwen_image.transformer import QWEN_IMAGE_TRANSFORMER_SPECS, QwenImageTransformer2DModel
    from tests.compile.test_qwen_image import _inputs

    torch.manual_seed(0)
    net = QwenImageTransformer2DModel(QWEN_IMAGE_TRANSFORMER_SPECS["tiny"]).eval()
    inputs = _inputs(1, False)
    program = trace_module(net, inputs)
    with torch.no_grad():
        unfused = program.module()(**inputs)
    counters = PassManager(fusion_passes("fast", enable=("cat_linear_rows",))).run(program)
    assert counters.matches["cat_linear_rows"] == QWEN_IMAGE_TRANSFORMER_SPECS["tiny"].num_layers
    with torch.no_grad():
        fused = program.module()(**inputs)
    unwrap = lambda o: o[0] if isinstance(o, tuple) else getattr(o, "sample", o)  # noqa: E731
    assert rel_err(unwrap(fused), unwrap(unfused)) < GRAPH_TOL[torch.float32]
