"""A block's concatenation of its own inputs (FLUX.1's single-stream blocks join the text and image streams):
the region runner passes a view where the pieces already lie end to end in one buffer, a copy otherwise."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn

from diffc.compile import trace_module
from diffc.compile.pipeline import _installed, compile_dit
from diffc.compile.prepack import written
from diffc.compile.regions import RegionGraph, dit_regions, joined
from tests.compile.conftest import build

aten = torch.ops.aten


def _shares(view: torch.Tensor, base: torch.Tensor) -> bool:
    return (view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
            and view.data_ptr() == base.data_ptr())


@pytest.mark.parametrize("batch", [1, 3])
def test_slices_of_one_buffer_join_without_a_copy(batch):
    base = torch.randn(batch, 11, 8)
    pieces = [base[:, :4], base[:, 4:9], base[:, 9:]]
    out = joined(pieces, 1)
    assert torch.equal(out, torch.cat(pieces, 1))
    assert _shares(out, base) and out.is_contiguous() and out.shape == base.shape
    assert _shares(joined([base[:, :4], base[:, 4:]], -2), base)  # a negative dim
    assert _shares(joined([base[:, :0], base], 1), base)  # an empty piece adds nothing
    if batch > 1:  # batch items one after the other are one sequence as well
        out = joined([base[:1], base[1:2]], 1)
        assert _shares(out, base) and torch.equal(out, torch.cat([base[:1], base[1:2]], 1))


def test_a_slice_of_a_larger_buffer_joins_into_a_view_of_its_part():
    base = torch.randn(20, 6)
    out = joined([base[3:5], base[5:9]], 0)
    assert torch.equal(out, base[3:9]) and out.data_ptr() == base[3:].data_ptr()


@pytest.mark.parametrize("case", ["separate", "swapped", "gap", "strided", "dtype", "width"])
def test_pieces_that_do_not_lie_end_to_end_are_copied(case):
    base = torch.randn(2, 10, 8)
    pieces = {
        "separate": [torch.randn(2, 3, 8), torch.randn(2, 7, 8)],
        "swapped": [base[:, 4:], base[:, :4]],  # the right memory, in the other order
        "gap": [base[:, :3], base[:, 4:]],
        "strided": [base[:, :4, ::2], base[:, 4:, ::2]],  # end to end, but the join is not contiguous
        "dtype": [base[:, :4], base[:, 4:].to(torch.float64)],  # torch.cat promotes
        "width": [base[:, :4, :6], base[:, 4:, :6]],  # end to end per row, with gaps between rows
    }[case]
    out = joined(pieces, 1)
    ref = torch.cat(pieces, 1)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    assert out.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()


class _SingleStream(nn.Module):
    """A FLUX-like single-stream block: joins (text, image), works on the joint sequence, splits it again."""

    def __init__(self, width: int = 8, reread: bool = False):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.reread = reread

    def forward(self, hidden_states, encoder_hidden_states, temb):
        text = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        x = x + self.proj(x) * temb[:, None]
        if self.reread:  # the image stream read again besides the concatenation
            x = x + hidden_states.sum()
        return x[:, text:], x[:, :text]


def _graph(block: nn.Module, inputs: dict) -> RegionGraph:
    return RegionGraph(trace_module(block, inputs))


def _inputs(batch=2, image=6, text=3, width=8):
    return {"hidden_states": torch.randn(batch, image, width), "encoder_hidden_states": torch.randn(batch, text, width),
            "temb": torch.randn(batch, width)}


def test_a_block_joining_its_inputs_reads_them_as_one_view(monkeypatch):
    torch.manual_seed(0)
    blocks = [_SingleStream() for _ in range(3)]
    inputs = _inputs()
    graph = _graph(blocks[0], inputs)
    assert [s for s in graph.sources if s[0] == "joined"] == [("joined", ((1, 0), 1))]
    assert not any(n.target == aten.cat.default for n in graph.gm.graph.nodes)

    cats = []
    real_cat = torch.cat

    def counting_cat(tensors, *args, **kwargs):
        cats.append(len(tensors))
        return real_cat(tensors, *args, **kwargs)

    def run(step):
        hidden, encoder = inputs["hidden_states"], inputs["encoder_hidden_states"]
        for block in blocks:
            hidden, encoder = step(block, hidden, encoder)
        return hidden, encoder

    with torch.no_grad():
        eager = run(lambda b, h, e: b(h, e, inputs["temb"]))
        monkeypatch.setattr(torch, "cat", counting_cat)
        compiled = run(lambda b, h, e: graph(b, (), {"hidden_states": h, "encoder_hidden_states": e,
                                                      "temb": inputs["temb"]}))
    assert cats == [2]  # the first block's inputs are two tensors; the others get their predecessor's slices
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want)


def test_an_input_read_besides_the_concatenation_keeps_the_copy():
    graph = _graph(_SingleStream(reread=True), _inputs())
    assert not any(kind == "joined" for kind, _ in graph.sources)
    assert any(n.target == aten.cat.default for n in graph.gm.graph.nodes)


def test_a_concatenation_written_in_place_is_not_joined():
    """A view of another block's output must never be written: ``written`` follows views and split pieces."""
    graph = fx.Graph()
    a, b, other = graph.placeholder("a"), graph.placeholder("b"), graph.placeholder("other")
    cat = graph.call_function(aten.cat.default, ([a, b], 1))
    view = graph.call_function(aten.view.default, (cat, [-1]))
    graph.call_function(aten.add.Tensor, (view, other))  # reads only
    assert not written(cat)
    pieces = graph.call_function(aten.split.Tensor, (view, 2))
    first = graph.call_function(operator.getitem, (pieces, 0))
    graph.call_function(aten.copy_.default, (first, other))
    assert written(cat)


def test_flux_single_blocks_join_their_streams_bit_exactly(monkeypatch):
    """FLUX.1's single-stream blocks: one graph input for the joint sequence, a copy only for the first
    block (the double-stream blocks hand over two tensors), the same bytes as the graph that copies."""
    bf16 = torch.bfloat16
    outs = []
    for fold in (True, False):
        if not fold:
            monkeypatch.setattr(RegionGraph, "_fold_input_concats", lambda self: None)
        net, inputs = build("flux", bf16)
        graphs: dict = {}
        compile_dit(net, inputs, graphs=graphs, device=torch.device("cpu"), dtype=bf16, tier="fast")
        single = next(iter(graphs["single_transformer_blocks"].values()))
        assert any(kind == "joined" for kind, _ in single.sources) == fold
        with _installed(dit_regions(net), graphs), torch.no_grad():
            outs.append(net(**inputs)[0])
    assert torch.equal(outs[0], outs[1])


def test_traced_pieces_are_concatenated_without_reading_pointers(recwarn):
    """Meta and fake tensors (a trace through the runner) have no memory to share: the copy, and no warning
    about a fake tensor's data pointer."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    meta = torch.empty(2, 10, 4, device="meta")
    assert joined([meta[:, :3], meta[:, 3:]], 1).shape == (2, 10, 4)
    with FakeTensorMode():
        fake = torch.empty(2, 10, 4)
        assert joined([fake[:, :3], fake[:, 3:]], 1).shape == (2, 10, 4)
    assert not [w for w in recwarn if "data pointer" in str(w.message)]
