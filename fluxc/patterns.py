"""The sparse-attention (SA) patterns: the one definition of which keys a sparse layer keeps.

Positions count from the sequence's first real key (left padding removed): a query at position q, a key at
position k, both >= 0 for real tokens. The SA branch keeps key k <= q of query q when

    keeps(k, sink, window_start(q, ...))        k < sink  or  k >= window_start(q)

- streaming, token-exact: the window is the last `window` keys, window_start(q) = q - window + 1;
- streaming, block-exact (the released code's rule): the window is the last window // block key blocks up to
  q's own block, window_start(q) = (q // block - window // block + 1) * block; sink and window are whole
  blocks (`pattern_problem`);
- triangle: streaming, and at prefill the rows q >= dense_from(last, n_last) (the last n_last prompt queries,
  last = the last prompt position) keep every key.

A new pattern is a new `window_start`/`dense_from`-style leaf plus its tests. The leaves are written with
Python operators only, so the same function evaluates on ints, torch tensors (the references, FlexAttention's
mask_mod, the decode ring), FX proxies (the routed score_mod of FlexAttention sites), ONNX values (through an
operator adapter in the exporter) and, wrapped by `triton.jit`, inside the Triton kernels, where BLOCK_EXACT
arrives as a constexpr. Triton's `//` and `%` truncate toward zero, so the leaves divide only non-negative
values wherever the result is used (real query positions; a ring slot's keys once it is written).

`sa_allowed` and `ring_valid` compose the leaves for plain-PyTorch callers; the kernels compose the same
leaves inline. Imports nothing (not even torch).
"""

from __future__ import annotations

PATTERNS = ("streaming", "triangle")


# ------------------------------------------------------------------------------ the rule (triton.jit-able)


def window_start(q, window, block, BLOCK_EXACT):
    """First key of the local window of the query at position q (q >= 0)."""
    if BLOCK_EXACT:
        return (q // block - window // block + 1) * block
    return q - window + 1


def window_reach(window: int, block: int, block_exact: bool) -> int:
    """Keys back from a query (itself included) that the SA window keeps for every query position: a model's
    own sliding window no wider than this is unchanged by the sparse branch."""
    return (window // block - 1) * block + 1 if block_exact else window


def keeps(k, sink, start):
    """True where the SA branch keeps key k: an attention sink, or at or after the window's `start`."""
    return (k < sink) | (k >= start)


def dense_from(last, n_last):
    """Triangle: the first query position of the dense rows (the last n_last of a prompt ending at `last`)."""
    return last - n_last + 1


def ring_slot(r, sink, window):
    """The ring slot of a key r >= sink (a sink r keeps slot r): later keys cycle through the window slots, so
    each new key overwrites the one that just left the window (blocks stay whole when block-exact)."""
    return sink + (r - sink) % window


def ring_key(j, p, window):
    """The key a ring window slot j (j >= sink) holds once keys 0..p are written (p >= j): slot j receives key
    j first, then every window-th key (a whole number of blocks when block-exact), so the latest one."""
    return j + window * ((p - j) // window)


# ------------------------------------------------------------------------------ composed (plain Python)


def sa_allowed(q, k, *, sink: int, window: int, block: int, block_exact: bool, last=None, n_last: int = 0):
    """SA keeps (q, k), for broadcastable positions (k <= q is the model's own causal rule, not checked here).

    `last` (the last prompt position, broadcastable) turns on the triangle's dense rows; None for streaming
    and for decode steps."""
    keep = keeps(k, sink, window_start(q, window, block, block_exact))
    if last is not None:
        keep = keep | (q >= dense_from(last, n_last))
    return keep


def ring_capacity(sink: int, window: int) -> int:
    """Slots of an SA layer's ring cache: the sinks and the window (whole blocks when block-exact)."""
    return sink + window


def ring_valid(j, p, *, sink: int, window: int, block: int, block_exact: bool):
    """True where ring slot j (0 <= j < sink + window) holds a key the query at position p keeps."""
    written = j <= p
    return written & ((j < sink) | (ring_key(j, p, window) >= window_start(p, window, block, block_exact)))


def pattern_problem(*, pattern: str, sink: int, window: int, block: int, block_exact: bool, n_last: int) -> str | None:
    """Why these parameters do not define a pattern, or None. The wording names the fix."""
    if pattern not in PATTERNS:
        return f"pattern={pattern!r} is not a pattern; use one of {PATTERNS}"
    for name, value in (("sink", sink), ("n_last", n_last)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{name}={value!r} must be an int >= 0"
    for name, value in (("window", window), ("block", block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{name}={value!r} must be an int >= 1"
    if block_exact and (sink % block or window % block):
        return (f"block_exact=True needs sink ({sink}) and window ({window}) to be multiples of block ({block}); "
                f"change them or set block_exact=False")
    return None
