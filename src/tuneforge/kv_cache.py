"""The KV cache `generate.Batch` decodes with: transformers' `DynamicCache` whose attention layers, full and
sliding-window alike, write into columns allocated ahead instead of concatenating.

`DynamicLayer` grows by `torch.cat`, which copies every row's whole cache at every step: at 32
rows of a few hundred tokens that copy costs more than the step's matmuls. `PreallocatedLayer`
writes a step's keys and values into the next free columns and doubles its storage when full, so a
step costs its own tokens. Its `keys` and `values` are views of the used columns, so code that reads
or replaces them (`Batch` merging rows in, trimming columns no row uses) works as on `DynamicLayer`.

A sliding-window layer (Gemma 2 and 3, Mistral's and Qwen's with a window set) is a `PreallocatedLayer` too, not
transformers' `DynamicSlidingWindowLayer`, which keeps only its window's last columns: it keeps every column, and
the model still attends over the window alone, since transformers builds the sliding mask from the layer's length
(`get_mask_sizes`) whatever it keeps. Rows then merge, leave and start from `PrefixCache` entries as on full layers;
the cost is memory: those layers hold every token's keys and values, as full ones do, rather than the window's
(Gemma 3, five sliding layers to one full: up to six times the keys and values of a long context). The mask counts
columns, not positions, so a row's tokens must sit in adjacent columns (padding only on their left): `Batch`
prefills such models so.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers import DynamicCache, DynamicLayer
from transformers.cache_utils import DynamicSlidingWindowLayer

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
    """A cache for one prefill: `PreallocatedLayer` in place of every full-attention and sliding-window layer."""
    cache = DynamicCache(config=config)
    cache.layers = [
        PreallocatedLayer() if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else layer
        for layer in cache.layers
    ]
    return cache


def has_sliding_window(config) -> bool:
    """Whether any of the model's layers attends over a sliding window (the layers transformers' `DynamicCache`
    makes `DynamicSlidingWindowLayer` for)."""
    return any(DynamicCache(config=config).is_sliding)


class PrefixCache:
    """Keys and values of prompts run before and of their replies, so a later prompt that starts with the same
    tokens (a shared system prompt, the earlier turns of a conversation a chat client sends again, replies included)
    runs only the rest: automatic prefix caching, as vLLM's and llama.cpp's servers do it. `Batch` looks up and
    stores (a prompt as it is prefilled, then the prompt and its reply as the row leaves); `serve`'s engine owns one.

    An entry is one prompt's (and reply's) keys and values, every layer's [1, heads, tokens, dim], under a scope:
    what else they depend on, a tuple of the model as served (the base, or one loading of an adapter) and the
    prompt's images. A lookup finds the longest run of leading tokens that any entry of its scope shares with the
    prompt; the keys and values of those positions depend on those tokens alone, so they are the prompt's own.
    Entries are kept least recently used first and dropped from that end past `max_bytes`; an entry whose tokens
    start a newer one is dropped for it, since the newer holds all it holds.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        # (scope, tokens) -> the tokens as an array (compared at every lookup: converted once) and every layer's
        # keys and values.
        self._entries: OrderedDict[tuple, tuple[np.ndarray, list[tuple[torch.Tensor, torch.Tensor]]]] = OrderedDict()
        self._bytes = 0
        self.hits = 0  # prompts that started from an entry
        self.misses = 0  # prompts looked up that found none
        self.cached_tokens = 0  # prompt tokens that were not run again

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def find(self, scope, tokens: Sequence[int], least: int = 1) -> tuple[int, tuple | None]:
        """The longest prefix of `tokens` (at least `least` tokens) that an entry of `scope` holds, and that entry's
        key; (0, None) where none does. Finding counts nothing: `take` does, for the prompts that run."""
        best, found, tokens = 0, None, np.asarray(tokens)
        for key, (held, _) in self._entries.items():
            if key[0] == scope and (shared := _shared_length(held, tokens)) > best:
                best, found = shared, key
        return (best, found) if best >= least else (0, None)

    def take(self, found: tuple[int, tuple | None]) -> list | None:
        """Count `find`'s answer as one prompt's hit or miss, keep the entry it found as recently used, and give the
        keys and values of its prefix (views of the entry's: read them, do not write into them); None for a miss.
        Nothing may be stored between the `find` and its `take`, since a store can drop the entry."""
        length, key = found
        if key is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        self.cached_tokens += length
        return [(keys[:, :, :length], values[:, :, :length]) for keys, values in self._entries[key][1]]

    def store(
        self, scope, tokens: Sequence[int], layers: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]
    ) -> None:
        """Keep the keys and values of `tokens` for prompts that start with them: `layers()` gives them (each
        layer's [1, heads, len(tokens), dim], owned by the cache from then on), called only where no entry holds
        these tokens already, so a prompt or reply the cache has costs no copy."""
        held = np.asarray(tokens)
        covered = []  # entries whose tokens these start with: dropped for the new one, once it is kept
        for key, (entry_tokens, _) in self._entries.items():
            if key[0] != scope:
                continue
            shared = _shared_length(entry_tokens, held)
            if shared == len(held):  # an entry holds these tokens already
                self._entries.move_to_end(key)
                return
            if shared == len(entry_tokens):
                covered.append(key)
        built = layers()
        size = sum(keys.nbytes + values.nbytes for keys, values in built)
        if size > self.max_bytes:  # too big to keep: the entries it would cover stay
            return
        for key in covered:
            self._drop(key)
        self._entries[(scope, tuple(tokens))] = (held, built)
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def forget(self, keep: Callable[[object], bool]) -> None:
        """Drop the entries whose model (a scope's first part) `keep` refuses: an adapter unloaded or evicted,
        whose weights may differ when it loads again."""
        for key in [key for key in self._entries if not keep(key[0][0])]:
            self._drop(key)

    def _drop(self, key: tuple) -> None:
        self._bytes -= sum(keys.nbytes + values.nbytes for keys, values in self._entries.pop(key)[1])


def _shared_length(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
