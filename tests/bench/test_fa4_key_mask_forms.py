"""bench.ops.fa4_key_mask_forms: the block-sparse lists it gives FA4 for a key mask (plain torch, so checked here),
and bad arguments refused by name (the forms themselves need flash-attn-4 on a GPU)."""

from __future__ import annotations

import pytest
import torch

from bench.ops.fa4_key_mask_forms import key_block_lists, main


def test_key_blocks_are_full_partial_or_skipped():
    """Per 128-key block: all kept -> full, some -> partial, none -> in neither list; each list's blocks first, in
    order; every query block alike; a block cut short by the sequence's end is partial at most."""
    keep = torch.ones(3, 300, dtype=torch.bool)
    keep[0, 40:128] = False  # Qwen-Image's prompt padding: block 0 partial, block 1 full, block 2 (44 keys) partial
    keep[1, :256] = False  # blocks 0 and 1 keep nothing
    keep[2, 130] = False  # one dropped key in block 1
    partial_cnt, partial_idx, full_cnt, full_idx = key_block_lists(keep, seq_q=260)
    assert all(t.dtype == torch.int32 for t in (partial_cnt, partial_idx, full_cnt, full_idx))
    assert partial_cnt.shape == full_cnt.shape == (3, 1, 3) and partial_idx.shape == full_idx.shape == (3, 1, 3, 3)
    rows = [(partial_cnt[b, 0, 0].item(), partial_idx[b, 0, 0].tolist(), full_cnt[b, 0, 0].item(),
             full_idx[b, 0, 0].tolist()) for b in range(3)]
    assert rows == [(2, [0, 2, 1], 1, [1, 0, 2]), (1, [2, 0, 1], 0, [0, 1, 2]), (2, [1, 2, 0], 1, [0, 1, 2])]
    assert torch.equal(partial_idx[:, :, :1].expand_as(partial_idx), partial_idx)
    assert torch.equal(full_cnt[:, :, :1].expand_as(full_cnt), full_cnt)
    everything = key_block_lists(torch.ones(1, 256, dtype=torch.bool), seq_q=1)
    assert everything[0].tolist() == [[[0]]] and everything[2].tolist() == [[[2]]]


@pytest.mark.parametrize(("argv", "field"), [
    (["--heads", "0"], "--heads"),
    (["--text-tokens", "0"], "--text-tokens"),
    (["--kept", "0"], "--kept"),
    (["--kept", "200", "--text-tokens", "128"], "--kept"),
])
def test_bad_arguments_name_the_field(argv, field):
    with pytest.raises(SystemExit, match=field):
        main(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_needs_a_gpu():
    with pytest.raises(SystemExit, match="CUDA GPU"):
        main([])
