"""A slot KV cache: one row per running sequence, kept compact so a decode step reads a prefix.

Layout per layer: ``k, v`` of shape ``(max_slots, kv_heads, capacity, head_dim)``. The running
batch always occupies slots ``0 .. n-1``: when a sequence leaves, the last occupied slot moves
into its place (one row copy), so attention over the batch uses a view ``[:n, :, :len]`` and
never gathers. Capacity along the sequence axis grows by doubling up to ``max_len``, so memory
follows the longest live sequence rather than the model's context limit.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        max_slots: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        initial_capacity: int = 128,
    ) -> None:
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.dtype = dtype
        self.device = device
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lengths = [0] * max_slots  # tokens stored per slot
        self.used = 0  # slots 0..used-1 are occupied
        self.ensure_capacity(min(initial_capacity, max_len))

    # -- capacity ------------------------------------------------------------------------------
    def ensure_capacity(self, length: int) -> None:
        """Make room for ``length`` tokens per slot (doubling, capped at ``max_len``)."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds the cache limit {self.max_len}")
        new_cap = max(self.capacity, 16)
        while new_cap < length:
            new_cap *= 2
        new_cap = min(new_cap, self.max_len)
        shape = (self.max_slots, self.kv_heads, new_cap, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        if self.capacity:
            for i in range(self.num_layers):
                new_k[i][:, :, : self.capacity] = self.k[i]
                new_v[i][:, :, : self.capacity] = self.v[i]
        self.k, self.v, self.capacity = new_k, new_v, new_cap

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # -- slots ---------------------------------------------------------------------------------
    def allocate(self) -> int:
        if self.used >= self.max_slots:
            raise RuntimeError("no free KV slot (scheduler admitted more than max_batch)")
        slot = self.used
        self.used += 1
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> int | None:
        """Release ``slot``. Returns the slot that moved into it (the caller must update the
        sequence that owned it), or None if nothing moved."""
        if not 0 <= slot < self.used:
            raise ValueError(f"slot {slot} is not occupied")
        last = self.used - 1
        moved = None
        if slot != last:
            n = self.lengths[last]
            for i in range(self.num_layers):
                self.k[i][slot, :, :n] = self.k[i][last, :, :n]
                self.v[i][slot, :, :n] = self.v[i][last, :, :n]
            self.lengths[slot] = n
            moved = last
        self.lengths[last] = 0
        self.used -= 1
        return moved

    # -- reads and writes ----------------------------------------------------------------------
    def write_prefill(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v`` of shape ``(kv_heads, T, head_dim)`` at positions ``start..start+T``."""
        t = k.shape[-2]
        self.k[layer][slot, :, start : start + t] = k
        self.v[layer][slot, :, start : start + t] = v

    def write_decode(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | None = None
    ) -> None:
        """Store token ``n`` of ``k, v`` (``(N, kv_heads, head_dim)``) in slot ``slots[n]`` at
        ``positions[n]``; ``slots`` None: one token per slot ``0..N-1``."""
        rows = torch.arange(k.shape[0], device=self.device) if slots is None else slots
        self.k[layer][rows, :, positions] = k
        self.v[layer][rows, :, positions] = v

    def view(self, layer: int, slots: slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][slots, :, :length], self.v[layer][slots, :, :length]
