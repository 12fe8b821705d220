"""The KV cache `generate.Batch` decodes with: transformers' `DynamicCache` whose full-attention
layers write into columns allocated ahead instead of concatenating.

`DynamicLayer` grows by `torch.cat`, which copies every row's whole cache at every step: at 32
rows of a few hundred tokens that copy costs more than the step's matmuls. `PreallocatedLayer`
writes a step's keys and values into the next free columns and doubles its storage when full, so a
step costs its own tokens. Its `keys` and `values` are views of the used columns, so code that reads
or replaces them (`Batch` merging rows in, trimming columns no row uses) works as on `DynamicLayer`.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, DynamicLayer

MIN_COLUMNS = 256
"""Columns a layer first allocates: a usual prompt and reply fit without growing."""


class PreallocatedLayer(DynamicLayer):
    def __init__(self):
        self._keys, self._values = _Columns(), _Columns()
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return self._keys.used()

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._keys.replace(tensor)

    @property
    def values(self) -> torch.Tensor | None:
        return self._values.used()

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._values.replace(tensor)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._keys.append(key_states), self._values.append(value_states)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys.select_rows(indices)
        self._values.select_rows(indices)


class _Columns:
    """A [rows, heads, columns, dim] storage of which the first `length` columns are in use."""

    def __init__(self):
        self.store: torch.Tensor | None = None
        self.length = 0

    def used(self) -> torch.Tensor | None:
        return None if self.store is None else self.store[:, :, : self.length]

    def replace(self, tensor: torch.Tensor | None) -> None:
        self.store = tensor
        self.length = 0 if tensor is None else tensor.shape[-2]

    def append(self, states: torch.Tensor) -> torch.Tensor:
        start, end = self.length, self.length + states.shape[-2]
        if self.store is None or end > self.store.shape[-2]:
            batch, heads, _, dim = states.shape
            # Twice the columns used, so growing (a copy) is rare.
            grown = states.new_empty(batch, heads, max(end, 2 * start, MIN_COLUMNS), dim)
            if start:
                grown[:, :, :start] = self.store[:, :, :start]
            self.store = grown
        self.store[:, :, start:end] = states
        self.length = end
        return self.used()

    def select_rows(self, indices: torch.Tensor) -> None:
        # From the whole storage, so its free columns stay for the steps to come.
        if self.store is not None:
            self.store = self.store[indices]


def new_cache(config) -> DynamicCache:
    """A cache for one prefill: `PreallocatedLayer` in place of every plain full-attention layer."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
