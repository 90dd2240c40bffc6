"""Where the copies of touched weights live on a GPU: on the device while it has room, page-locked on the
host otherwise; either way unmerge restores every weight bit for bit and in place."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffc.lora import LoraManager
from diffc.lora.stash import WeightStash

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = torch.device("cuda")
HUGE = 1 << 62


def test_copies_go_to_the_gpu_while_it_has_room_then_to_pinned_host_memory():
    weights = [torch.randn(256, 512, device=DEV, dtype=torch.bfloat16) for _ in range(3)]
    originals = [w.clone() for w in weights]
    nbytes = weights[0].numel() * weights[0].element_size()
    free, _total = torch.cuda.mem_get_info(DEV)
    free += torch.cuda.memory_reserved(DEV) - torch.cuda.memory_allocated(DEV)
    stash = WeightStash(reserve=free - int(1.5 * nbytes))  # room for exactly one copy
    for i, w in enumerate(weights):
        stash.save(("t", str(i)), w)
    first, second = stash.get(("t", "0")), stash.get(("t", "1"))
    assert first.device.type == "cuda" and second.device.type == "cpu" and second.is_pinned()
    assert stash.device_bytes == nbytes and stash.host_bytes == 2 * nbytes
    for i, w in enumerate(weights):
        w.fill_(7.0)  # the copies are copies
        assert torch.equal(stash.get(("t", str(i))).to(DEV), originals[i])


class Projections(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(64, 96), nn.Linear(96, 64)])


def _adapter(path, model, rank=4, seed=0):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, block in enumerate(model.blocks):
        out_f, in_f = block.weight.shape
        tensors[f"transformer.blocks.{i}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen)
        tensors[f"transformer.blocks.{i}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("reserve, where", [(0, "cuda"), (HUGE, "cpu")])
def test_merge_switch_unmerge_bit_exact_with_either_placement(tmp_path, reserve, where):
    torch.manual_seed(0)
    model = Projections().to(DEV, torch.bfloat16).requires_grad_(False)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    addresses = {k: v.data_ptr() for k, v in model.named_parameters()}
    manager = LoraManager({"transformer": model}, stash_reserve=reserve)
    manager.set("a", _adapter(tmp_path / "a.safetensors", model, seed=1))
    merged_a = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(merged_a["blocks.0.weight"], base["blocks.0.weight"])
    manager.set("b", _adapter(tmp_path / "b.safetensors", model, seed=2), strength=0.5)
    manager.set("a")  # back to a: restored from the copies, merged again
    assert all(torch.equal(v, merged_a[k]) for k, v in model.state_dict().items())
    manager.unmerge()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    assert {k: v.data_ptr() for k, v in model.named_parameters()} == addresses
    assert {manager.stash.get(("transformer", "blocks.0.weight")).device.type} == {where}
    placed = manager.describe()
    assert (placed["device_copy_bytes"] > 0) == (where == "cuda") and (placed["host_copy_bytes"] > 0) == (where == "cpu")


@pytest.mark.parametrize("reserve", [0, HUGE])
def test_a_merge_that_turns_a_weight_infinite_rolls_back_on_the_gpu(tmp_path, reserve):
    """The finiteness of each merged weight is read once after the loop (copied without a wait); the second block
    overflows (4 x 1e38 > float32's max), so the first block's merge is undone and adapter ``a`` is merged again, bit for bit."""
    from safetensors.torch import save_file

    from diffc.errors import CheckpointError

    torch.manual_seed(0)
    model = Projections().to(DEV, torch.bfloat16).requires_grad_(False)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    manager = LoraManager({"transformer": model}, stash_reserve=reserve)
    manager.set("a", _adapter(tmp_path / "a.safetensors", model, seed=1))
    merged_a = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {f"transformer.blocks.{i}.lora_{ab}.weight": torch.ones(shape) * value
               for i, block in enumerate(model.blocks)
               for ab, shape, value in (("A", (4, block.weight.shape[1]), 0.01 if i == 0 else 1.0),
                                        ("B", (block.weight.shape[0], 4), 0.01 if i == 0 else 1e38))}
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"transformer\.blocks\.1\.weight: merging LoRA 'bad' makes this "
                                              r"weight NaN or infinite"):
        manager.set("bad", tmp_path / "bad.safetensors")
    assert all(torch.equal(v, merged_a[k]) for k, v in model.state_dict().items())
    assert [a.nickname for a in manager.active] == ["a"]
    manager.unmerge()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
