"""A KV cache for continuous batching whose decode step writes in place.

transformers' `DynamicLayer` concatenates on every step, so each decode step copies the whole cache of
every layer and a step's cost grows with the batch's width: at batch 32 and width 476, `torch.cat` was
half of a decode step (`benchmarks/kv_cache.py`). `SlabLayer` keeps each layer's keys and values in a
buffer with spare columns to the right and spare rows below; the live cache is the view
`[:rows, :, start:end]`. A decode step writes one column; trimming leading padding moves `start`; a
finished row is replaced by the last row (one row copied, not the batch); newcomers are written into
spare rows. A buffer is reallocated only when it runs out of room, with headroom in proportion to what
it holds, so the copying is amortised O(1) columns per step instead of O(width).

Buffers are the prefill's own tensors or start zeroed, and only ever hold values the model wrote, so
the stale columns that left padding exposes are finite and masked out: they never reach a softmax as NaN.
"""
from __future__ import annotations

from typing import Any, Sequence

from transformers.cache_utils import DynamicLayer

__all__ = ["SlabLayer", "to_slabs"]

MIN_SPARE_COLUMNS = 32
MIN_SPARE_ROWS = 4


def _spare(n: int, least: int) -> int:
    return max(least, n // 2)


class SlabLayer(DynamicLayer):
    """One layer's keys and values as views into preallocated buffers (see the module docstring)."""

    def __init__(self, keys, values):
        """Adopt a prefill's keys and values as the buffers, without copying: a prefilled batch that is
        merged into the running one is read once and dropped; one that starts running gets its spare
        room at its first step's reallocation."""
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        self._k, self._v = keys, values
        self.rows, self.start, self.end = keys.shape[0], 0, keys.shape[2]
        self._sync()

    # ---- the transformers cache-layer interface ----------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        if self.end + n > self._k.shape[2]:
            live = self.end - self.start + n
            rows = max(self._k.shape[0], self.rows + _spare(self.rows, MIN_SPARE_ROWS))
            self._realloc(rows, live + _spare(live, MIN_SPARE_COLUMNS))
        self._k[: self.rows, :, self.end : self.end + n] = key_states
        self._v[: self.rows, :, self.end : self.end + n] = value_states
        self.end += n
        self._sync()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.start

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("use move_rows(): a slab compacts rows by moving the last ones into holes")

    # ---- what the scheduler does between steps -----------------------------------------------
    def trim_left(self, columns: int) -> None:
        """Forget the first `columns` live columns (padding no row attends to any more)."""
        self.start += columns
        self._sync()

    def move_rows(self, holes: Sequence[int], movers: Sequence[int], rows: int) -> None:
        """Copy rows `movers` into rows `holes`, then keep the first `rows` rows."""
        if holes:
            self._k[list(holes), :, self.start : self.end] = self._k[list(movers), :, self.start : self.end]
            self._v[list(holes), :, self.start : self.end] = self._v[list(movers), :, self.start : self.end]
        self.rows = rows
        self._sync()

    def append_rows(self, other: SlabLayer, width: int) -> None:
        """Add `other`'s rows below ours; both right-aligned to a common live width `width`, which is at
        least either's. Columns to the left of a row's own history are masked by the caller's padding."""
        ours, theirs = self.end - self.start, other.end - other.start
        rows = self.rows + other.rows
        if rows > self._k.shape[0] or self.end - width < 0:
            self._realloc(rows + _spare(rows, MIN_SPARE_ROWS), width + _spare(width, MIN_SPARE_COLUMNS),
                          left=width - ours)
        self.start = self.end - width
        at = slice(self.end - theirs, self.end)
        self._k[self.rows : rows, :, at] = other.keys
        self._v[self.rows : rows, :, at] = other.values
        self.rows = rows
        self._sync()

    # ---- internals ------------------------------------------------------------------------------
    def _realloc(self, row_capacity: int, column_capacity: int, left: int = 0) -> None:
        """New zeroed buffers; the live window is copied to start at column `left`."""
        import torch

        keys, values = self.keys, self.values
        _, heads, width, dim = keys.shape
        shape = (row_capacity, heads, max(column_capacity, left + width), dim)
        new_k = torch.zeros(shape, dtype=keys.dtype, device=keys.device)
        new_v = torch.zeros(shape, dtype=values.dtype, device=values.device)
        new_k[: self.rows, :, left : left + width] = keys
        new_v[: self.rows, :, left : left + width] = values
        self._k, self._v = new_k, new_v
        self.start, self.end = left, left + width
        self._sync()

    def _sync(self) -> None:
        self.keys = self._k[: self.rows, :, self.start : self.end]
        self.values = self._v[: self.rows, :, self.start : self.end]


def to_slabs(cache: Any) -> None:
    """Turn a freshly prefilled cache's plain dynamic layers into slabs, in place. Caches with other
    layer types (sliding windows, quantized...) are left as they are: they cannot be merged or trimmed."""
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) is DynamicLayer for layer in layers):
        cache.layers = [SlabLayer(layer.keys, layer.values) for layer in layers]
