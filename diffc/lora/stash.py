"""Copies of the weights a LoRA touched, kept so that unmerging restores them bit for bit.

A weight is copied once, the first time any adapter touches it, and the copy is kept for the life
of the pipeline (base weights never change), so switching adapters costs a copy and a merge, never a
read of the checkpoint.

Where a copy of a CUDA weight lives is decided per weight when it is saved:

- on the weight's own GPU while that leaves at least ``reserve`` of the GPU free (a device-to-device
  copy: FLUX.1-dev's 17 GB of touched weights are saved in milliseconds, and restored as fast);
- otherwise in page-locked host memory, in chunks (``CHUNK_BYTES`` each, 512-byte aligned slots), so
  restores run at copy-engine speed without the power-of-two rounding of one pinned allocation per
  tensor. Page-locking is the slow part of a first load (seconds per ten gigabytes), which is why the
  GPU is preferred while it has room.

``reserve`` (the free GPU memory a device copy must leave) defaults to a quarter of the GPU, at least
``MIN_RESERVE_BYTES``: room for a generation's activations, the VAE decode and the text encoders.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 256 << 20
ALIGN = 512
MIN_RESERVE_BYTES = 16 << 30
RESERVE_FRACTION = 0.25


class WeightStash:
    """``save(key, tensor)`` once, ``get(key)`` after: a tensor equal to what was saved (on the weight's
    GPU or on the host, see the module docstring). ``reserve``: free GPU bytes a device copy must leave
    (None: the default above; 0 puts every copy on the GPU it fits on; a huge value forces the host)."""

    def __init__(self, reserve: int | None = None):
        if reserve is not None and reserve < 0:
            raise ValueError(f"reserve must be >= 0 bytes, got {reserve}")
        self.reserve = reserve
        self._copies: dict[tuple[str, str], torch.Tensor] = {}
        self._chunk: torch.Tensor | None = None
        self._used = 0
        self.nbytes = 0
        self.device_bytes = 0

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._copies

    @property
    def host_bytes(self) -> int:
        return self.nbytes - self.device_bytes

    def describe(self) -> dict[str, int]:
        """Bytes of copies on the host and on the GPU (what ``list_loras`` and the perf dump report)."""
        return {"host_copy_bytes": self.host_bytes, "device_copy_bytes": self.device_bytes}

    def get(self, key: tuple[str, str]) -> torch.Tensor:
        return self._copies[key]

    def save(self, key: tuple[str, str], tensor: torch.Tensor) -> None:
        if key in self._copies:
            return
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type == "cuda" and self._fits_on_device(tensor.device, nbytes):
            copy = tensor.detach().clone()
            self.device_bytes += nbytes
        elif tensor.device.type == "cuda":
            copy = self._pinned(tensor)
            copy.copy_(tensor)
        else:
            copy = tensor.detach().clone()
        self._copies[key] = copy
        self.nbytes += nbytes

    def _fits_on_device(self, device: torch.device, nbytes: int) -> bool:
        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's own cache
        reserve = self.reserve if self.reserve is not None else max(MIN_RESERVE_BYTES, int(total * RESERVE_FRACTION))
        return free - nbytes >= reserve

    def _pinned(self, like: torch.Tensor) -> torch.Tensor:
        nbytes = like.numel() * like.element_size()
        if nbytes > CHUNK_BYTES // 4:
            return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
        if self._chunk is None or self._used + nbytes > CHUNK_BYTES:
            self._chunk = torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True)
            self._used = 0
        view = self._chunk[self._used:self._used + nbytes].view(like.dtype).view(like.shape)
        self._used += -(-nbytes // ALIGN) * ALIGN
        return view
