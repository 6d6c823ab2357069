"""The decode engine: routes fixed at prefill and kept as device data, a paged KV cache, one CUDA graph per
batch bucket.

    engine = fluxc.DecodeEngine(fluxc.compile(model, router_ckpt))
    outs = engine.generate([prompt_a, prompt_b, prompt_c], max_new_tokens=64)   # prompts of any length

Prompts waiting together are prefilled in one forward (left-padded to the longest; one compile serves every
batch and length) and write their keys straight into pages of the shared pool (`fluxc.serve.paged`): a model
of this size is host-bound at prefill, so one forward for eight prompts costs little more than for one. Its routes are read to the host
once, at admission, to size its pages: a layer it runs sparse keeps only its sink + window ring, so memory
follows routes. Decode steps run the whole batch with one graph: each layer's attention is one
`fluxc::paged_attention` that reads routes, block tables and lengths from device memory, so a new routing
mask needs no trace, no compile, no capture and no host sync. Batches are padded to buckets (2, 4, 8, ...);
on CUDA each bucket is captured once as a CUDA graph and replayed. Sequences join as slots free up
(continuous batching) and return their pages when they finish.
"""

from __future__ import annotations

import collections
import inspect
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fluxc.backend import flux_backend_of, private_forward
from fluxc.errors import CapacityError, ConfigError, FluxError, RequestError, RouteError
from fluxc.inputs import check_attention_mask, check_token_ids, vocab_size
from fluxc.ops.paged import compact_ring
from fluxc.patterns import ring_capacity
from fluxc.serve.cache import check_engine_model, sliding_layers
from fluxc.serve.paged import PagedCache, PagePool
from fluxc.serve.sampling import SamplingConfig, select_tokens
from fluxc.spec import SiteSpec

if TYPE_CHECKING:
    from fluxc.api import FluxModule

log = logging.getLogger("fluxc")

MIN_BUCKET = 2  # Dynamo specialises a batch of 1: buckets start at 2, so one compile serves every bucket
CPU_POOL_BYTES = 2 << 30  # the default pool's ceiling on CPU
DEVICE_MEMORY_UTILIZATION = 0.9  # of the device memory free at allocation, for the pool and prefill activations


def prefill_activation_bytes(text_config: Any, tokens: int, dtype: torch.dtype, vocab: int | None) -> int:
    """An estimate of the transient device memory of a prefill forward over `tokens` tokens: one decoder
    layer's widest moment (the MLP's gate, up and their product beside two copies of the residual stream), plus
    float32 logits over `vocab` for every token when the model cannot keep only the last position's (None: it
    can). On Llama-3.1-8B (bf16, H100) the transient measured at 8 x 32K tokens was 0.91x of it."""
    hidden = text_config.hidden_size
    intermediate = getattr(text_config, "intermediate_size", None) or 4 * hidden
    per_token = (3 * intermediate + 2 * hidden) * torch.finfo(dtype).bits // 8
    if vocab is not None:
        per_token += 4 * vocab
    return tokens * per_token


def default_pool_pages(*, wanted: int, page_bytes: int, free_bytes: int, reserve_bytes: int) -> tuple[int, str]:
    """Pages of the default pool on CUDA: `wanted` (every slot at max_len with full attention) or what fits in
    `DEVICE_MEMORY_UTILIZATION` of the free memory after `reserve_bytes` of prefill activations, and why."""
    budget = int(DEVICE_MEMORY_UTILIZATION * free_bytes) - reserve_bytes
    if wanted * page_bytes <= budget:
        return wanted, "every slot at max_len with full attention"
    if budget < 2 * page_bytes:
        raise CapacityError(
            f"no device memory is left for a KV pool: {free_bytes / 2**30:.2f} GiB free, "
            f"{reserve_bytes / 2**30:.2f} GiB kept for prefill activations; lower max_prefill_tokens or max_len, "
            f"or pass num_pages=")
    return budget // page_bytes, (f"{DEVICE_MEMORY_UTILIZATION:.0%} of free device memory "
                                  f"({free_bytes / 2**30:.2f} GiB) less {reserve_bytes / 2**30:.2f} GiB kept for "
                                  f"prefill activations")


@dataclass(eq=False)  # compared by identity: a slot holds this very request
class _Sequence:
    """One request on the host: where it sits, what it holds, how far it is."""

    request: int
    length: int  # keys written
    remaining: int  # new tokens still to produce
    pages: list[list[int]]  # per layer
    routes: tuple[bool, ...]  # per layer, True = full attention
    rings: tuple[bool, ...]  # per layer, True = its KV is a ring (a sparse route, or a local layer's window)
    reserved: int  # pages kept back for its full-attention layers to grow into
    steps: list[tuple[int, int]] = field(default_factory=list)  # (step, row) of each token it produced
    done: bool = False
    nonfinite: Tensor | None = None  # () bool on the device: its logits were NaN / inf at some step
    error: RequestError | None = None
    margins: tuple[float, ...] = ()  # per layer, the router's margin over the operating point (NaN: no router)


@dataclass
class GenerationState:
    """The requests one `prefill` admitted, for `decode` (the lower-level API; `generate` drives the same)."""

    requests: list[int]
    next_tokens: Tensor  # (B, 1) the tokens prefill picked
    route: Tensor  # (B, L) bool on the host, True = full attention
    prompt_lens: list[int]
    max_new_tokens: int
    decoded: int = 1
    stats: dict[str, Any] = field(default_factory=dict)


class DecodeEngine:
    """Generation for an HF-style causal LM compiled with `fluxc.compile`.

    `max_batch`: sequences decoded together (slots). `max_len`: the longest prompt + answer (default: the
    model's max_position_embeddings). `page_size`: keys per page. `num_pages`: the pool (default: every slot at
    `max_len` in every layer with full attention; on CUDA at most 90% of the free device memory less what a
    prefill of max(max_prefill_tokens, max_len) tokens needs for its activations (`prefill_activation_bytes`,
    logged); on CPU at most 2 GiB).
    `cuda_graphs`: "auto" (on for CUDA models), True (raise if impossible) or False (the same steps eagerly).
    `max_prefill_tokens`: the most padded tokens (prompts x the longest) `generate` prefills in one forward;
    prompts waiting beyond it go in the next (a bound on the prefill's activation memory, which the default pool
    leaves free).
    `batch_invariant`: every decode step runs the largest bucket, so a request's tokens do not depend on how
    many others share its steps (bf16 GEMMs and the split-KV decode split their work, hence round, by batch
    size); it costs the padded rows' work when few requests run.

    A request that fails (its pages cannot be allocated, its logits turn NaN / inf) ends with a `RequestError`
    (`error_of`) while the others run on untouched. One thread at a time drives an engine: its methods hold
    the compiled model's lock (`FluxModule.lock`), so other threads wait.
    """

    def __init__(self, model: FluxModule, *, max_batch: int = 8, max_len: int | None = None, page_size: int = 16,
                 num_pages: int | None = None, cuda_graphs: bool | str = "auto",
                 max_prefill_tokens: int = 65536, batch_invariant: bool = False) -> None:
        if flux_backend_of(model) is None:
            raise ConfigError(f"model must be a fluxc.compile(...) result (FluxModule), got {type(model).__name__}")
        if not (isinstance(cuda_graphs, bool) or (isinstance(cuda_graphs, str) and cuda_graphs == "auto")):
            raise ConfigError(f"cuda_graphs={cuda_graphs!r}: use True, False or 'auto'")
        if not isinstance(batch_invariant, bool):
            raise ConfigError(f"batch_invariant={batch_invariant!r}: use True or False")
        for name, value, low in (("max_batch", max_batch, 1), ("page_size", page_size, 1),
                                 ("max_prefill_tokens", max_prefill_tokens, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}={value!r} must be an int >= {low}")
        self.model = model
        self.lock: threading.RLock = model.lock  # the route state and the pool are shared: one driver at a time
        self.cuda_graphs = cuda_graphs
        self._cache_kw = check_engine_model(model.model, model.flux_config)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.model.forward).parameters
        text = model.model.config.get_text_config()
        self.num_layers = text.num_hidden_layers
        self.kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.max_len = max_len or getattr(text, "max_position_embeddings", None) or 4096
        self.vocab = vocab_size(model.model)
        self.page_size = page_size
        self.max_prefill_tokens = max_prefill_tokens
        self.width = math.ceil(self.max_len / page_size)  # block table columns
        self.buckets = tuple(sorted({max(MIN_BUCKET, 1 << (b - 1).bit_length()) for b in range(1, max_batch + 1)}))
        if batch_invariant:
            self.buckets = self.buckets[-1:]
        self.max_batch = self.buckets[-1]
        self._num_pages = num_pages
        self.spec = SiteSpec.for_config(model.flux_config)
        # the model's own local layers (sliding windows the SA branch would not narrow) keep a ring of their window
        self.local = sliding_layers(model.model)
        self.layer_specs = [self.spec.replace(sink=0, window=self.local[layer], block_exact=False)
                            if layer in self.local else self.spec for layer in range(self.num_layers)]
        self._spec_texts = [spec.encode() for spec in self.layer_specs]
        self.rings = [ring_capacity(spec.sink, spec.window) for spec in self.layer_specs]
        self._sites_checked = False
        self.stats: collections.Counter = collections.Counter()
        self.pool: PagePool | None = None
        self._slots: list[_Sequence | None] = []
        self._requests: dict[int, _Sequence] = {}
        self._next_request = 0
        self._step_count = 0
        self._outputs: list[Tensor] = []  # (rows, 1) tokens of each step
        self._graphs: dict[int, Any] = {}
        self._warm = False  # warm_up ran: later compiles are logged and counted
        self._decode_fn = torch.compile(private_forward(model.model), backend=model._backend, fullgraph=True)

    # --- set-up
    def allocate(self) -> None:
        """Allocate the KV pool and the decode step's buffers now, on the model's device and dtype, as a server
        does at start-up; otherwise the first request does (and pays for it)."""
        with self.lock:
            if self.pool is None:
                parameter = next(self.model.model.parameters())
                self._allocate(parameter.device, parameter.dtype)

    def _allocate(self, device: torch.device, dtype: torch.dtype) -> None:
        """The pool and the decode step's buffers (one set, the bucket's graphs read prefixes of them)."""
        probe = PagePool(2, self.page_size, self.kv_heads, self.head_dim, self.head_dim, dtype, device)
        pages = self._num_pages
        if pages is None:
            wanted = self.max_batch * self.num_layers * self.width + 1
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                reserve = prefill_activation_bytes(self.model.model.config.get_text_config(),
                                                   max(self.max_prefill_tokens, self.max_len), dtype,
                                                   None if self._logits_to_keep else self.vocab)
                pages, why = default_pool_pages(wanted=wanted, page_bytes=probe.page_bytes, free_bytes=free,
                                                reserve_bytes=reserve)
            elif wanted * probe.page_bytes > CPU_POOL_BYTES:
                pages, why = CPU_POOL_BYTES // probe.page_bytes, f"{CPU_POOL_BYTES / 2**30:.0f} GiB on CPU"
            else:
                pages, why = wanted, "every slot at max_len with full attention"
            log.info("fluxc: the decode engine's KV pool holds %d pages of %d keys (%.2f GiB): %s", pages,
                     self.page_size, pages * probe.page_bytes / 2**30, why)
        self.pool = PagePool(pages, self.page_size, self.kv_heads, self.head_dim, self.head_dim, dtype, device)
        rows = self.max_batch
        self.tokens = torch.zeros((rows, 1), dtype=torch.long, device=device)  # the step's input, then its output
        self.lengths = torch.zeros(rows, dtype=torch.int32, device=device)  # keys per row, 0 = no sequence
        self.routes = torch.ones((rows, self.num_layers), dtype=torch.bool, device=device)
        self.nonfinite = torch.zeros(rows, dtype=torch.bool, device=device)  # per row: NaN / inf logits seen
        # (B, L, W): a bucket's rows [:B] keep the same strides whatever B (one compile for every bucket)
        self.tables = torch.zeros((rows, self.num_layers, self.width), dtype=torch.int32, device=device)
        self.logits: Tensor | None = None
        self._slots = [None] * rows
        self._reserved = 0

    def _use_graphs(self, device: torch.device) -> bool:
        if self.cuda_graphs == "auto":
            return device.type == "cuda"
        if self.cuda_graphs and device.type != "cuda":
            raise ConfigError(f"cuda_graphs=True needs a CUDA model, got device {device}; use cuda_graphs='auto'")
        return bool(self.cuda_graphs)

    # --- admission
    def pages_needed(self, prompt_len: int, max_new_tokens: int) -> int:
        """The most pages a request can take (every layer with full attention)."""
        return self.num_layers * math.ceil((prompt_len + max_new_tokens) / self.page_size)

    def can_admit(self, prompt_len: int, max_new_tokens: int) -> bool:
        """A free slot and enough pages, after what admitted requests may still grow into."""
        return (self.pool is None or (None in self._slots and self.pool.free - self._reserved
                                      >= self.pages_needed(prompt_len, max_new_tokens)))

    def _check_request(self, prompt: Tensor, max_new_tokens: int) -> Tensor:
        check_token_ids(prompt, name="prompt", dims=1, vocab=self.vocab)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
        if prompt.numel() + max_new_tokens > self.max_len:
            raise CapacityError(f"a prompt of {prompt.numel()} tokens + max_new_tokens={max_new_tokens} exceeds "
                                f"max_len={self.max_len}; build the DecodeEngine with a larger max_len")
        return prompt.to(torch.long)

    @torch.no_grad()
    def add_request(self, prompt: Tensor, max_new_tokens: int, sampling: SamplingConfig | None = None) -> int:
        """Prefill one prompt (1-D token ids) into a free slot; returns its request id. Raises CapacityError
        when no slot or not enough pages are free (`can_admit` says in advance)."""
        return self.add_requests([prompt], max_new_tokens, sampling)[0]

    @torch.no_grad()
    def add_requests(self, prompts: list[Tensor], max_new_tokens: int,
                     sampling: SamplingConfig | None = None) -> list[int]:
        """Prefill several prompts (1-D token ids of any lengths) in one forward, each into a free slot; returns
        their request ids. One forward pays the host's per-layer launches once for all of them, so a server
        admits what is waiting together. Raises CapacityError when the slots or pages cannot take all of them."""
        with self.lock:
            return self._add_requests(list(prompts), max_new_tokens, sampling or SamplingConfig())

    def _add_requests(self, prompts: list[Tensor], max_new_tokens: int, sampling: SamplingConfig) -> list[int]:
        if not prompts:
            return []
        device = next(self.model.model.parameters()).device
        prompts = [self._check_request(p, max_new_tokens).to(device) for p in prompts]
        self.allocate()
        assert self.pool is not None
        free_slots = [slot for slot, seq in enumerate(self._slots) if seq is None]
        if len(prompts) > len(free_slots):
            raise CapacityError(f"{len(prompts)} prompt(s) for {len(free_slots)} free decode slots: "
                                f"{self.max_batch - len(free_slots)} of {self.max_batch} decode slots are taken; "
                                f"finish requests first or build the DecodeEngine with a larger max_batch")
        worst = sum(self.pages_needed(p.numel(), max_new_tokens) for p in prompts)
        if self.pool.free - self._reserved < worst:
            raise CapacityError(f"the KV pool has {self.pool.free - self._reserved} pages to spare, {len(prompts)} "
                                f"request(s) of {'+'.join(str(p.numel()) for p in prompts)} + {max_new_tokens} tokens "
                                f"may need {worst}; give DecodeEngine more pages (num_pages=) or wait for running "
                                f"requests")
        first, seqs = self._prefill(prompts, max_new_tokens, sampling)
        for slot, seq in zip(free_slots, seqs):
            self._slots[slot] = seq
            self._requests[seq.request] = seq
            self._write_row(slot, seq)
        self.tokens[free_slots[:len(seqs)]] = first
        self._outputs.append(first)  # (n, 1): each prefill token is its request's first
        for row, seq in enumerate(seqs):
            seq.steps.append((len(self._outputs) - 1, row))
            self.stats["prefills"] += 1
            if seq.remaining == 0:  # max_new_tokens=1: the prefill's token was all
                self.finish(seq.request)
        self.stats["prefill_forwards"] += 1
        return [seq.request for seq in seqs]

    def _prefill(self, prompts: list[Tensor], max_new_tokens: int,
                 sampling: SamplingConfig) -> tuple[Tensor, list[_Sequence]]:
        assert self.pool is not None
        requests, taken = [], []
        try:
            for index, prompt in enumerate(prompts):
                requests.append(self._next_request)  # an id per admission attempt, failed ones too
                self._next_request += 1
                per_layer = math.ceil(prompt.numel() / self.page_size)
                try:
                    taken.append(self.pool.take(self.num_layers * per_layer, owner=requests[-1]))
                except CapacityError as exc:
                    exc.prompt_index = index  # type: ignore[attr-defined]  (which prompt of the batch failed)
                    raise
            return self._prefill_into(requests, prompts, max_new_tokens, sampling, taken)
        except BaseException:  # out of memory, an interrupt: the requests never started, their pages go back
            for pages in taken:
                self.pool.give_back(pages)
            raise

    def _prefill_into(self, requests: list[int], prompts: list[Tensor], max_new_tokens: int,
                      sampling: SamplingConfig, taken: list[list[int]]) -> tuple[Tensor, list[_Sequence]]:
        assert self.pool is not None
        device = prompts[0].device
        counts = [p.numel() for p in prompts]
        longest = max(*counts, 2)
        # Rows are left-padded to the longest prompt (each writes its last `count` keys, the padding goes to the
        # scratch page). A one-token prompt gets a padding column: Dynamo specialises sizes of 1, so lengths from 2
        # share one compile. Batches do not get a companion row, which would double a long prompt's work: one
        # prompt and several compile one graph each (both at warm_up).
        rows = len(prompts)
        ids = torch.zeros((rows, longest), dtype=torch.long)  # (B, T)
        mask = torch.zeros((rows, longest), dtype=torch.long)  # (B, T) 1 = a prompt token
        table = torch.zeros((rows, self.num_layers, self.width), dtype=torch.int32)  # (B, L, W); 0: scratch
        lengths = torch.tensor(counts, dtype=torch.int32)  # (B,) keys per row after the prefill
        pages = []
        for row, (count, own) in enumerate(zip(counts, taken)):
            per_layer = math.ceil(count / self.page_size)
            pages.append([own[i * per_layer:(i + 1) * per_layer] for i in range(self.num_layers)])
            table[row, :, :per_layer] = torch.tensor(own, dtype=torch.int32).view(self.num_layers, per_layer)
            mask[row, longest - count:] = 1
        ids = ids.to(device)
        for row, prompt in enumerate(prompts):
            ids[row, longest - counts[row]:] = prompt
        mask = mask.to(device)
        positions = (mask.cumsum(1) - 1).clamp_min(0)  # (B, T) each prompt counts from its first token
        table = table.to(device)
        cache = PagedCache(self.pool, table, lengths.to(device),
                           torch.ones((rows, self.num_layers), dtype=torch.bool, device=device), self._spec_texts,
                           phase="prefill")
        # One compile serves every batch and prompt length. Not the strict mark_dynamic: on CUDA, SDPA's fake
        # kernel guards the length in a form its range check rejects (torch 2.11); a real specialisation shows as
        # a compile after warm-up, which is logged. With sliding-window layers, HF's mask branches on the window:
        # prompts past it compile once more.
        for tensor in (ids, mask, positions):
            torch._dynamo.maybe_mark_dynamic(tensor, 1)
        for tensor in (ids, mask, positions, cache.tables, cache.lengths, cache.routes):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        before = self.compiles
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_kw: cache}, **extra)
        self._note_compiles(f"a prefill of {len(prompts)} prompt(s) of up to {longest} tokens", before)
        logits = out.logits[:len(prompts), -1]  # (n, V) left padding: every prompt ends at the last column
        first = select_tokens(logits, sampling)  # (n, 1)
        state = self.model.route_state
        if state.route.shape[1] != self.num_layers:
            raise RouteError(f"the model has {state.route.shape[1]} routed attention sites but {self.num_layers} "
                             f"layers; the decode engine needs one routed site per cached layer")
        if not self._sites_checked:
            self._check_local_sites()
        nonfinite_before = self.stats["nonfinite_routes"]
        rows = len(prompts)
        read = torch.cat([state.route[:rows].to(torch.float64).flatten(), state.margin[:rows].to(torch.float64).flatten(),
                          state.nonfinite.view(1).to(torch.float64)]).tolist()
        undecided = int(read.pop())  # the one host read of the admitted requests' routes and their margins
        width = self.num_layers
        routes_read, margins_read = read[:rows * width], read[rows * width:]  # (rows, layers) each, row-major
        self.stats["nonfinite_routes"] = undecided  # the route state counts every sequence since compile
        if undecided > nonfinite_before:
            log.warning("fluxc: requests %s: the router gave non-finite logits in %d layer(s); they run full "
                        "attention", requests, undecided - nonfinite_before)
        finite = torch.isfinite(logits).all(dim=-1)  # (n,)
        seqs = []
        for row, (request, count) in enumerate(zip(requests, counts)):
            at = slice(row * width, (row + 1) * width)
            routes = tuple(bool(r) for r in routes_read[at])
            seqs.append(self._settle(request, count, max_new_tokens, pages[row], routes, table[row],
                                     ~finite[row]))
            seqs[-1].margins = tuple(margins_read[at])
        return first, seqs

    def _settle(self, request: int, count: int, max_new_tokens: int, pages: list[list[int]],
                routes: tuple[bool, ...], table: Tensor, nonfinite: Tensor) -> _Sequence:
        """A prefilled prompt's sequence: its sparse layers' keys move to their rings and the pages past the
        ring go back; the pages its full layers may still grow into are reserved."""
        assert self.pool is not None
        per_layer = math.ceil(count / self.page_size)
        reserved = 0
        rings = self._ring_layers(routes)
        for layer, ring in enumerate(rings):
            if not ring:
                reserved += math.ceil((count + max_new_tokens - 1) / self.page_size) - per_layer
                continue
            capacity = self.rings[layer]
            ring_pages = math.ceil(min(count, capacity) / self.page_size)
            compact_ring(self.pool.k, self.pool.v, table[layer, :per_layer], count, self.layer_specs[layer])
            self.pool.give_back(pages[layer][ring_pages:])
            pages[layer] = pages[layer][:ring_pages]
            reserved += math.ceil(min(count + max_new_tokens - 1, capacity) / self.page_size) - ring_pages
        self._reserved += reserved
        return _Sequence(request, count, max_new_tokens - 1, pages, routes, rings, reserved, nonfinite=nonfinite)

    def _ring_layers(self, routes: tuple[bool, ...]) -> tuple[bool, ...]:
        """Per layer, whether a sequence with `routes` keeps a ring there: a sparse route, or a local layer."""
        return tuple(not full or layer in self.local for layer, full in enumerate(routes))

    def _check_local_sites(self) -> None:
        """The local layers the engine read off the config are those the pass found (once, after the first trace)."""
        backend = flux_backend_of(self.model)
        found = {site.layer: site.local_window for site in (backend.sites or []) if site.local_window}
        if found != self.local:
            raise RouteError(f"the model's config names local sliding-window layers {self.local} but the pass found "
                             f"{found} (layer: window); the decode engine cannot size their caches, use "
                             f"fluxc.generate(..., engine=False)")
        self._sites_checked = True

    def _write_row(self, slot: int, seq: _Sequence) -> None:
        """The slot's block tables, length and routes on the device (host-built, copied without a sync)."""
        row = torch.zeros((self.num_layers, self.width), dtype=torch.int32)
        for layer, own in enumerate(seq.pages):
            row[layer, :len(own)] = torch.tensor(own, dtype=torch.int32)
        self.tables[slot].copy_(row, non_blocking=True)
        self.lengths[slot] = seq.length
        self.nonfinite[slot] = False
        # the decode kernels' route: full pages, or a ring (a sparse route, or a local layer's window)
        self.routes[slot].copy_(~torch.tensor(seq.rings), non_blocking=True)

    # --- decode
    def _grow(self) -> None:
        """Before a step: every live sequence's next key gets a slot; a full-attention layer crossing a page
        boundary takes a page (host bookkeeping, one small copy to the device, no sync)."""
        assert self.pool is not None
        updates: list[tuple[int, int, int, int]] = []
        for slot, seq in enumerate(list(self._slots)):
            if seq is None or seq.done:
                continue
            position = seq.length  # the key this step writes
            try:
                for layer, ring in enumerate(seq.rings):
                    index = (min(position, self.rings[layer] - 1) if ring else position) // self.page_size
                    if index >= len(seq.pages[layer]):
                        page = self.pool.take(1, owner=seq.request)[0]
                        seq.pages[layer].append(page)
                        seq.reserved -= 1
                        self._reserved -= 1
                        updates.append((layer, slot, index, page))
            except CapacityError as exc:  # this request alone ends; the step runs on for the others
                updates = [u for u in updates if u[1] != slot]
                self._fail(seq, f"no page for its key {position}", exc)
                continue
            seq.length += 1
        if updates:
            layer, slot, index, page = (torch.tensor(col) for col in zip(*updates))
            device = self.tables.device
            self.tables[slot.to(device), layer.to(device), index.to(device)] = page.to(device, torch.int32)
        live = torch.tensor([0 if s is None or s.done else s.length for s in self._slots], dtype=torch.int32)
        self.lengths.copy_(live, non_blocking=True)

    def _bucket(self) -> int:
        last = max((i for i, s in enumerate(self._slots) if s is not None and not s.done), default=0)
        return next(b for b in self.buckets if b > last)

    def _step(self, bucket: int, sampling: SamplingConfig) -> None:
        """One decode step of rows [0, bucket): write each row's key, attend, pick its next token."""
        lengths = self.lengths[:bucket]
        cache = PagedCache(self.pool, self.tables[:bucket], lengths, self.routes[:bucket], self._spec_texts,
                           phase="decode")
        tokens = self.tokens[:bucket]
        positions = (lengths.to(torch.long) - 1).clamp_min(0).view(-1, 1)  # (B, 1)
        for tensor, dim in ((tokens, 0), (positions, 0), (lengths, 0), (cache.routes, 0), (cache.tables, 0)):
            torch._dynamo.mark_dynamic(tensor, dim, min=MIN_BUCKET, max=max(self.max_batch, MIN_BUCKET + 1))
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self._decode_fn(input_ids=tokens, position_ids=positions, use_cache=True, **{self._cache_kw: cache},
                              **extra)
        logits = out.logits[:, -1, :]  # (B, V)
        if self.logits is None:  # the first (warm-up) step allocates it, before any capture
            self.logits = torch.empty((self.max_batch, logits.shape[-1]), dtype=torch.float32, device=logits.device)
        self.logits[:bucket].copy_(logits)
        # read at check points, not every step; rows without a sequence (lengths 0) compute on scratch
        self.nonfinite[:bucket] |= ~torch.isfinite(logits).all(dim=-1) & (lengths > 0)
        tokens.copy_(select_tokens(logits, sampling))

    def _capture(self, bucket: int, sampling: SamplingConfig) -> Any:
        saved = self.tokens.clone(), self.lengths.clone(), self.nonfinite.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (traces, compiles, autotunes) off the capture
            self._step(bucket, sampling)
        torch.cuda.current_stream().wait_stream(stream)
        # the warm-up wrote each row's next key: writing it again below (and at replay) gives the same values
        self.tokens.copy_(saved[0])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(bucket, sampling)
        self.tokens.copy_(saved[0])
        self.lengths.copy_(saved[1])
        self.nonfinite.copy_(saved[2])
        self.stats["graphs_captured"] += 1
        return graph

    @torch.no_grad()
    def step(self, sampling: SamplingConfig | None = None) -> list[int]:
        """One decode step of every live request; returns the requests that finished with it (their pages are
        back in the pool, their tokens in `tokens_of`)."""
        with self.lock:
            return self._step_all(sampling or SamplingConfig())

    def _step_all(self, sampling: SamplingConfig) -> list[int]:
        live = [s for s in self._slots if s is not None and not s.done]
        if not live:
            return []
        self._grow()
        if not any(s is not None and not s.done for s in self._slots):
            return []  # every live request failed to grow
        bucket = self._bucket()
        before = self.compiles
        if self._use_graphs(self.tokens.device):
            key = (bucket, sampling)
            if key not in self._graphs:
                self._graphs[key] = self._capture(bucket, sampling)
            self._graphs[key].replay()
            self.stats["replays"] += 1
        else:
            self._step(bucket, sampling)
            self.stats["eager_steps"] += 1
        self._note_compiles(f"a decode step of batch bucket {bucket}", before)
        self._outputs.append(self.tokens[:bucket].clone())
        self._step_count += 1
        finished = []
        for slot, seq in enumerate(self._slots):
            if seq is None or seq.done:
                continue
            seq.steps.append((len(self._outputs) - 1, slot))
            seq.remaining -= 1
            if seq.remaining == 0:
                finished.append(seq.request)
        for request in finished:
            self.finish(request)
        return finished

    def finish(self, request: int) -> None:
        """End a request now (done, stopped at EOS or cancelled): its pages go back to the pool and its slot frees.
        Its tokens so far stay readable with `tokens_of`."""
        seq = self._known(request)
        if seq.done:
            return
        assert self.pool is not None
        seq.done = True
        for own in seq.pages:
            self.pool.give_back(own)
        seq.pages = [[] for _ in seq.pages]
        self._reserved -= seq.reserved
        seq.reserved = 0
        slot = next(i for i, s in enumerate(self._slots) if s is seq)
        self._slots[slot] = None
        seq.nonfinite = self.nonfinite[slot] | seq.nonfinite if seq.nonfinite is not None else self.nonfinite[slot].clone()
        self.nonfinite[slot] = False
        self.tables[slot].zero_()  # the row writes to the scratch page from now on
        self.lengths[slot] = 0

    def cancel(self, request: int) -> None:
        """Stop a request (the client went away): its pages return to the pool now; `error_of` says cancelled."""
        with self.lock:
            seq = self._known(request)
            if not seq.done:
                seq.error = RequestError(f"request {request} was cancelled after {len(seq.steps)} tokens")
                self.stats["cancelled"] += 1
                self.finish(request)

    def _fail(self, seq: _Sequence, why: str, cause: BaseException | None = None) -> None:
        error = RequestError(f"request {seq.request} failed after {len(seq.steps)} tokens: {why}; the batch's other "
                             f"requests are unaffected")
        error.__cause__ = cause
        seq.error = error
        self.stats["failed"] += 1
        log.warning("fluxc: %s", error)
        self.finish(seq.request)

    def check_faults(self) -> list[int]:
        """Fail the live requests whose logits turned NaN / inf (one host read); returns them."""
        with self.lock:
            live = [(slot, s) for slot, s in enumerate(self._slots) if s is not None and not s.done]
            if not live:
                return []
            flags = self.nonfinite.tolist()
            failed = []
            for slot, seq in live:
                if flags[slot] or bool(seq.nonfinite):
                    self._fail(seq, "its logits became NaN / inf (check the model's weights and this prompt)")
                    failed.append(seq.request)
            return failed

    def error_of(self, request: int) -> RequestError | None:
        """Why a request ended early (failed or cancelled), or None when it produced every token it was asked
        for with finite logits (a finished request's flag is read here: one host read)."""
        seq = self._known(request)
        if seq.error is None and seq.done and seq.nonfinite is not None and bool(seq.nonfinite):
            self._fail(seq, "its logits became NaN / inf (check the model's weights and this prompt)")
        return seq.error

    def finished(self, request: int) -> bool:
        """Whether a request ended (all its tokens, EOS, cancelled or failed): its pages are back in the pool."""
        return self._known(request).done

    def collect(self, request: int) -> Tensor | RequestError:
        """A finished request's new tokens (or its RequestError); the engine then forgets it (a server's loop:
        `step`, then `collect` what `step` returned)."""
        with self.lock:
            seq = self._known(request)
            if not seq.done:
                raise ConfigError(f"request {request} is still running; collect it once step() returned it "
                                  f"(or cancel it)")
            error = self.error_of(request)
            out = error if error is not None else self.tokens_of(request)
            del self._requests[request]
            if not self._requests:
                self._outputs.clear()
            return out

    def _known(self, request: int) -> _Sequence:
        seq = self._requests.get(request)
        if seq is None:
            raise ConfigError(f"request {request!r} is not known to this engine (finished requests are forgotten by "
                              f"release() and generate())")
        return seq

    @property
    def next_request_id(self) -> int:
        """The id the next admission attempt gets (ids count up from 0, failed admissions included)."""
        return self._next_request

    def tokens_of(self, request: int) -> Tensor:
        """(new,) the tokens a request produced so far, on the device."""
        seq = self._requests[request]
        return torch.cat([self._outputs[step][row] for step, row in seq.steps]) if seq.steps else self.tokens.new_empty(0)

    def kv_bytes(self, request: int) -> int:
        """Bytes of KV pages a live request holds (memory follows its routes)."""
        assert self.pool is not None
        return sum(len(own) for own in self._requests[request].pages) * self.pool.page_bytes

    def end(self, state: GenerationState) -> None:
        """Finish every request of `state` now (its pages return; its tokens so far stay readable)."""
        for request in state.requests:
            self.finish(request)

    def state_kv_bytes(self, state: GenerationState) -> int:
        """Bytes of KV pages `state`'s live requests hold."""
        return sum(self.kv_bytes(r) for r in state.requests)

    def routes_of(self, request: int) -> tuple[bool, ...]:
        """Per layer, True where the request runs full attention (decided at its prefill)."""
        return self._requests[request].routes

    def route_margins_of(self, request: int) -> tuple[float, ...]:
        """Per layer, the router's logit_full - logit_sparse over the operating point at the request's prefill
        (> 0 ran full; near 0 a near-tied decision); NaN where no router decided."""
        return self._requests[request].margins

    @property
    def reserved_pages(self) -> int:
        """Pages kept back for admitted requests' full-attention layers to grow into."""
        return self._reserved

    def pages_in_use(self) -> int:
        return 0 if self.pool is None else self.pool.num_pages - 1 - self.pool.free

    def release(self) -> None:
        """Forget finished requests' tokens and step outputs (their pages are already back)."""
        if any(s is not None for s in self._slots):
            raise ConfigError("requests are still running; finish them before release()")
        self._requests.clear()
        self._outputs.clear()

    @torch.no_grad()
    def warm_up(self, prompt_len: int = 16, sampling: SamplingConfig | None = None) -> float:
        """Trace and compile the prefill and the decode step, and capture every batch bucket's CUDA graph, on
        dummy prompts; returns the seconds it took. After it, requests of any length and routing mask trace,
        compile and capture nothing."""
        start = time.perf_counter()
        token = torch.ones(prompt_len, dtype=torch.long)
        for bucket in (1, *self.buckets):  # 1: a single prompt's prefill graph (Dynamo specialises a batch of 1)
            requests = self.add_requests([token] * bucket, 3, sampling)
            while any(not self._requests[r].done for r in requests):
                self.step(sampling)
            for request in requests:
                del self._requests[request]
        self._outputs.clear()
        if self.tokens.device.type == "cuda":
            torch.cuda.synchronize(self.tokens.device)
        self._warm = True
        return time.perf_counter() - start

    def _note_compiles(self, what: str, before: int) -> None:
        """Log a compile of the engine's own call after `warm_up` (graphs compiled since `before`): a recompile
        the warm-up did not cover. The model's other callers (its plain forward) compile graphs of their own."""
        new = self.compiles - before
        if self._warm and new > 0:
            log.warning("fluxc: %s compiled %d new graph(s) after warm_up; each such input pays a compile", what, new)
            self.stats["compiles_after_warm_up"] += new

    @property
    def compiles(self) -> int:
        """Graphs the model's backend compiled so far (3 once warm: the prefill of one prompt and of several, the
        decode step)."""
        return self.model._backend.graphs

    # --- the batch APIs
    @torch.no_grad()
    def prefill(self, input_ids: Tensor, *, max_new_tokens: int, attention_mask: Tensor | None = None,
                sampling: SamplingConfig | None = None) -> GenerationState:
        """Admit a left-padded batch (B, T) as B requests (padding dropped)."""
        prompts = split_prompts(input_ids, attention_mask)
        requests = self.add_requests(prompts, max_new_tokens, sampling)
        first = torch.cat([self.tokens_of(r)[:1] for r in requests]).view(-1, 1)
        route = torch.tensor([self.routes_of(r) for r in requests])
        return GenerationState(requests, first, route, [p.numel() for p in prompts], max_new_tokens)

    @torch.no_grad()
    def decode(self, state: GenerationState, steps: int, *, logits: list[Tensor] | None = None,
               sampling: SamplingConfig | None = None) -> Tensor:
        """`steps` more tokens of `state`'s requests, (B, steps) on the device (no host sync inside). With a
        `logits` list, each step's (B, V) float32 logits of those requests are appended (copies)."""
        if state.decoded + steps > state.max_new_tokens:
            raise ConfigError(f"decoding {steps} more tokens after {state.decoded} exceeds max_new_tokens="
                              f"{state.max_new_tokens} given to prefill (the pages are reserved for it)")
        slots = [next((i for i, s in enumerate(self._slots) if s is self._requests[r]), 0) for r in state.requests]
        for _ in range(steps):
            self.step(sampling)
            if logits is not None:
                assert self.logits is not None
                logits.append(self.logits[torch.tensor(slots, device=self.logits.device)].clone())
        state.decoded += steps
        return torch.stack([self.tokens_of(r)[state.decoded - steps: state.decoded] for r in state.requests])

    @torch.no_grad()
    def generate(self, prompts: Tensor | list[Tensor], max_new_tokens: int, *, attention_mask: Tensor | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | None = None, check_every: int = 16,
                 errors: str = "raise") -> Tensor | list[Tensor] | list[Tensor | RequestError]:
        """Prompts in, prompts + answers out. A list of 1-D prompts of any lengths gives a list of 1-D tensors
        (continuous batching: each joins as a slot and pages free up); a left-padded (B, T) batch gives
        (B, T + new). Every `check_every` steps one host read finds the requests that hit `eos_token_id` (their
        pages return at once; tokens after EOS are EOS) or whose logits turned NaN / inf.

        `errors="raise"`: a bad prompt raises before any work, a request that fails raises `RequestError` once
        the others finished. `errors="return"` (a list of prompts): a failed or invalid request's place in the
        result holds its `RequestError`; the others are their answers."""
        if not isinstance(errors, str) or errors not in ("raise", "return"):
            raise ConfigError(f"errors={errors!r}: use 'raise' or 'return'")
        if errors == "return" and isinstance(prompts, Tensor):
            raise ConfigError("errors='return' needs a list of prompts (a failed row has no place in a (B, T) tensor); "
                              "pass list(input_ids) or errors='raise'")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ConfigError(f"check_every={check_every!r} must be an int >= 1")
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
        batch = isinstance(prompts, Tensor)
        items = split_prompts(prompts, attention_mask) if batch else list(prompts)
        if not batch and attention_mask is not None:
            raise ConfigError("attention_mask is for a left-padded (batch, length) tensor; a list of prompts has no "
                              "padding: drop attention_mask")
        if not items:
            return prompts if batch else []
        rejected: dict[int, RequestError] = {}
        for index, prompt in enumerate(items):
            try:
                self._check_request(prompt, max_new_tokens)
            except FluxError as exc:
                if errors == "raise":
                    raise
                rejected[index] = request_error(index, exc)
        with self.lock:
            request_of = self._run(items, max_new_tokens, sampling, eos_token_id, check_every, rejected, errors)
            seqs = {index: self._requests[request] for index, request in request_of.items()}
            unread = [seq for seq in seqs.values() if seq.error is None and seq.nonfinite is not None]
            if unread:  # one host read for every request's NaN / inf flag
                for seq, bad in zip(unread, torch.stack([seq.nonfinite for seq in unread]).tolist()):
                    if bad:
                        self._fail(seq, "its logits became NaN / inf (check the model's weights and this prompt)")
            failures = {index: seq.error for index, seq in seqs.items() if seq.error is not None}
            outs: list[Tensor | RequestError] = []
            for index, prompt in enumerate(items):
                if index in rejected or index in failures:
                    outs.append(rejected.get(index) or failures[index])
                    continue
                new = self.tokens_of(request_of[index])
                if eos_token_id is not None:
                    after = (new == eos_token_id).cumsum(0) - (new == eos_token_id).long() > 0
                    new = new.masked_fill(after, eos_token_id)
                    new = torch.cat([new, new.new_full((max_new_tokens - new.numel(),), eos_token_id)])
                outs.append(torch.cat([prompt.to(new.device), new]))
            for request in request_of.values():
                del self._requests[request]
            if not self._requests:
                self._outputs.clear()
        if failures and errors == "raise":
            index, error = next(iter(failures.items()))
            raise RequestError(f"{len(failures)} of {len(items)} requests failed; the first, prompt {index}: {error} "
                               f"(errors='return' gives the others' answers)") from error
        if not batch:
            return outs
        return torch.cat([prompts.to(outs[0].device), torch.stack([o[-max_new_tokens:] for o in outs])], dim=1)

    def _run(self, items: list[Tensor], max_new_tokens: int, sampling: SamplingConfig, eos_token_id: int | None,
             check_every: int, rejected: dict[int, RequestError], errors: str) -> dict[int, int]:
        """Admit and decode `items` (but the rejected) until every one finished; returns index -> request id."""
        waiting = collections.deque((i, p) for i, p in enumerate(items) if i not in rejected)
        request_of: dict[int, int] = {}
        since_check = 0
        try:
            while waiting or any(s is not None for s in self._slots):
                admit = self._admissible(waiting, max_new_tokens)
                try:
                    if admit:
                        requests = self.add_requests([prompt for _, prompt in admit], max_new_tokens, sampling)
                        request_of.update(zip((index for index, _ in admit), requests))
                except (FluxError, torch.OutOfMemoryError) as exc:
                    if errors == "raise":
                        raise
                    failed = getattr(exc, "prompt_index", None)
                    if failed is not None:  # that prompt's pages: it alone fails, the others queue again
                        rejected[admit[failed][0]] = request_error(admit[failed][0], exc)
                        waiting.extendleft(reversed(admit[:failed] + admit[failed + 1:]))
                        continue
                    for index, prompt in admit:  # the forward failed: one at a time, so the prompt that fails
                        try:  # fails alone and the others run on
                            request_of[index] = self.add_request(prompt, max_new_tokens, sampling)
                        except (FluxError, torch.OutOfMemoryError) as single:
                            rejected[index] = request_error(index, single)
                if waiting and not any(s is not None for s in self._slots):
                    raise CapacityError(f"a prompt of {waiting[0][1].numel()} tokens + {max_new_tokens} new ones "
                                        f"needs {self.pages_needed(waiting[0][1].numel(), max_new_tokens)} pages, "
                                        f"more than the pool's {self.pool.num_pages - 1 if self.pool else 0}; give "
                                        f"DecodeEngine more pages")
                self.step(sampling)
                since_check += 1
                if since_check >= check_every:
                    since_check = 0
                    self.check_faults()
                    if eos_token_id is not None:
                        self._stop_at_eos(eos_token_id)
        except BaseException:  # leave no request of this call holding pages
            for request in request_of.values():
                self.finish(request)
                del self._requests[request]
            raise
        return request_of

    def _admissible(self, waiting: collections.deque, max_new_tokens: int) -> list[tuple[int, Tensor]]:
        """Pop the waiting (index, prompt)s, in order, that free slots and pages take now (admitted together)."""
        self.allocate()
        assert self.pool is not None
        slots, pages = self._slots.count(None), self.pool.free - self._reserved
        admit: list[tuple[int, Tensor]] = []
        longest = 0
        while waiting and len(admit) < slots:
            need = self.pages_needed(waiting[0][1].numel(), max_new_tokens)
            longest = max(longest, waiting[0][1].numel())
            if need > pages or (admit and (len(admit) + 1) * longest > self.max_prefill_tokens):
                break
            pages -= need
            admit.append(waiting.popleft())
        return admit

    def _stop_at_eos(self, eos_token_id: int) -> None:
        for seq in [s for s in self._slots if s is not None and not s.done]:
            if bool((self.tokens_of(seq.request) == eos_token_id).any()):  # a host read
                self.finish(seq.request)


def request_error(index: int, cause: BaseException) -> RequestError:
    """The RequestError of prompt `index` that was not served (`errors="return"`)."""
    error = RequestError(f"prompt {index} was not served: {cause}")
    error.__cause__ = cause
    return error


def split_prompts(input_ids: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
    """The rows of a left-padded (B, T) batch without their padding."""
    check_token_ids(input_ids, values=False)
    if attention_mask is None:
        return list(input_ids)
    check_attention_mask(attention_mask, *input_ids.shape)
    if attention_mask.dim() != 2:
        raise ConfigError(f"attention_mask.shape={tuple(attention_mask.shape)}: generation takes a (batch, length) "
                          f"padding mask")
    mask = attention_mask.to(torch.bool).cpu()
    t = mask.shape[1]
    n_real = mask.sum(dim=1)
    packed = torch.arange(t)[None, :] >= (t - n_real)[:, None]
    if not bool((packed == mask).all()) or bool((n_real == 0).any()):
        raise ConfigError("attention_mask must be left-padded (zeros before each prompt) with at least one real token "
                          "per row; pad on the left, as HF generate expects, or pass a list of prompts")
    return [row[t - int(n):] for row, n in zip(input_ids, n_real)]
