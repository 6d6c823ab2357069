"""The paged KV cache of the decode engine (vLLM's conventions: pages of `page_size` keys, one block table row
per sequence, a shared pool).

Every layer and sequence takes pages from one `PagePool`, so memory follows routes: a layer a sequence runs
with full attention takes a page every `page_size` keys; one it runs sparse holds the ring of its sink and
window (`fluxc.patterns`); a model's own local layer always holds the ring of its window. `PagedCache` is what the model sees: at prefill it writes the prompt's keys into
their pages (full-attention slots: the routes come out of this same forward) and hands the attention the
prompt's own keys; at decode it writes each sequence's new key and hands the attention `paged_view`s, which
the pass turns into one `fluxc::paged_attention` per layer reading routes, tables and lengths on the device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fluxc.errors import CapacityError
from fluxc.serve.cache import RoutedCache


class PagePool:
    """`num_pages` pages of K and V, (num_pages, page_size, kv_heads, head_dim) each; page 0 is scratch (rows with
    no sequence write there), never handed out. The free list lives on the host: taking and returning pages
    never syncs with the device."""

    def __init__(self, num_pages: int, page_size: int, kv_heads: int, head_dim: int, value_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        if num_pages < 2:
            raise CapacityError(f"num_pages={num_pages}: the pool needs page 0 (scratch) and at least one more")
        self.page_size = page_size
        self.k = torch.zeros((num_pages, page_size, kv_heads, head_dim), dtype=dtype, device=device)
        self.v = torch.zeros((num_pages, page_size, kv_heads, value_dim), dtype=dtype, device=device)
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low page ids first

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of K and V."""
        return (self.k[0].numel() * self.k.element_size()) + (self.v[0].numel() * self.v.element_size())

    def take(self, count: int, owner: int | None = None) -> list[int]:
        """`count` free page ids for request `owner` (None: the engine's own). Raises CapacityError."""
        if count > len(self._free):
            raise CapacityError(f"the KV pool has {len(self._free)} free pages of {self.page_size} keys, a request "
                                f"needs {count}; give DecodeEngine more pages (num_pages=) or fewer concurrent "
                                f"sequences (max_batch=)")
        return [self._free.pop() for _ in range(count)]

    def give_back(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


class PagedCache(RoutedCache):
    """The cache a forward of the decode engine sees: `tables` (B, L, W) int32, `lengths` (B,) keys after this
    forward's, `routes` (B, L) bool (False: the layer keeps a ring), all on the device; `specs` the SiteSpec text
    of each layer's ring layout (the SA pattern, or a local layer's own window)."""

    def __init__(self, pool: PagePool, tables: Tensor, lengths: Tensor, routes: Tensor, specs: list[str], *,
                 phase: str) -> None:
        super().__init__()
        self.pool, self.tables, self.lengths, self.routes, self.specs = pool, tables, lengths, routes, specs
        self.phase = phase

    @property
    def num_layers(self) -> int:
        return self.tables.shape[1]

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        table, route = self.tables[:, layer_idx], self.routes[:, layer_idx]  # (B, W), (B,)
        spec = self.specs[layer_idx]
        torch.ops.fluxc.paged_write(self.pool.k, self.pool.v, key_states, value_states, table, self.lengths, route,
                                    spec)
        if self.phase == "prefill":  # the prompt's attention reads its own keys
            return key_states, value_states
        view = torch.ops.fluxc.paged_view
        return (view(self.pool.k, table, self.lengths, route, spec), view(self.pool.v, table, self.lengths, route, spec))
