"""Host copies of the weights a LoRA touched, kept so that unmerging restores them bit for bit.

A weight is copied once, the first time any adapter touches it, and the copy is kept for the life
of the pipeline (base weights never change), so switching adapters costs a host-to-device copy and
a merge, never a read of the checkpoint. For CUDA weights the copies sit in page-locked chunks
(``CHUNK_BYTES`` each, 512-byte aligned slots) so restores run at copy-engine speed without the
power-of-two rounding of one pinned allocation per tensor.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 256 << 20
ALIGN = 512


class HostStash:
    """``save(key, tensor)`` once, ``get(key)`` after: a host tensor equal to what was saved."""

    def __init__(self):
        self._copies: dict[tuple[str, str], torch.Tensor] = {}
        self._chunk: torch.Tensor | None = None
        self._used = 0
        self.nbytes = 0

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._copies

    def get(self, key: tuple[str, str]) -> torch.Tensor:
        return self._copies[key]

    def save(self, key: tuple[str, str], tensor: torch.Tensor) -> None:
        if key in self._copies:
            return
        if tensor.device.type == "cuda":
            host = self._pinned(tensor)
            host.copy_(tensor)
        else:
            host = tensor.detach().clone()
        self._copies[key] = host
        self.nbytes += tensor.numel() * tensor.element_size()

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
