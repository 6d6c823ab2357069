"""Argument checks and pattern parameters shared by the Triton kernels, the FlexAttention lowering
and the reference.  Imports torch only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import KernelError

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PATTERNS = ("streaming", "triangle")
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Pattern:
    """Resolved sparse-attention pattern (what the kernels need as integers)."""

    sink_end: int  # keys [0, sink_end) are sinks
    window: int  # token-exact window (tokens), unused when block_exact
    window_blocks: int  # block-exact window in blocks, unused when not block_exact
    block: int  # block size of the block-exact rule
    block_exact: bool
    triangle: bool
    n_last: int
    native_window: int
    softcap: float


def resolve_pattern(*, sink: int, window: int, block: int, block_exact: bool, pattern: str = "streaming",
                    n_last: int = 0, softcap: float = 0.0, native_window: int = 0) -> Pattern:
    for name, val in (("sink", sink), ("window", window), ("block", block), ("n_last", n_last),
                      ("native_window", native_window)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise KernelError(f"{name}={val!r}: expected a Python int")
        if val < 0:
            raise KernelError(f"{name}={val}: must be >= 0")
    if pattern not in PATTERNS:
        raise KernelError(f"pattern={pattern!r}: expected one of {PATTERNS}")
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise KernelError(f"softcap={softcap!r}: expected a float >= 0 (0 disables soft-capping)")
    if block_exact:
        if block <= 0:
            raise KernelError(f"block={block}: block-exact streaming needs a positive block size")
        if sink % block or window % block:
            raise KernelError(
                f"sink={sink}, window={window}, block={block}: in block-exact mode sink and window must be "
                f"multiples of block; round them to multiples of {block} or pass block_exact=False")
        if window < block:
            raise KernelError(
                f"window={window}: block-exact streaming needs window >= block ({block}) so that every "
                "query sees its own block; raise window")
        return Pattern(sink_end=sink, window=window, window_blocks=window // block, block=block,
                       block_exact=True, triangle=pattern == "triangle", n_last=n_last,
                       native_window=native_window, softcap=float(softcap))
    if window < 1:
        raise KernelError(f"window={window}: token-exact streaming needs window >= 1 (the query itself)")
    return Pattern(sink_end=sink, window=window, window_blocks=0, block=max(block, 1), block_exact=False,
                   triangle=pattern == "triangle", n_last=n_last, native_window=native_window,
                   softcap=float(softcap))


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, names=("q", "k", "v"), kernel: bool = True,
              ) -> None:
    """Shapes/dtypes/strides; ``kernel=False`` (the reference) accepts any float dtype and head dim."""
    qn, kn, vn = names
    for name, t in ((qn, q), (kn, k), (vn, v)):
        if not isinstance(t, torch.Tensor):
            raise KernelError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise KernelError(f"{name}.shape={tuple(t.shape)}: expected 4 dims (batch, heads, tokens, head_dim)")
        if kernel and t.dtype not in SUPPORTED_DTYPES:
            raise KernelError(f"{name}.dtype={t.dtype}: expected float16, bfloat16 or float32")
        if not t.dtype.is_floating_point:
            raise KernelError(f"{name}.dtype={t.dtype}: expected a floating-point tensor")
        if kernel and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise KernelError(f"{name}.stride()={t.stride()}: the head dim must be contiguous; call .contiguous()")
    if not (q.dtype == k.dtype == v.dtype):
        raise KernelError(f"{qn}/{kn}/{vn} dtypes {q.dtype}/{k.dtype}/{v.dtype}: must all be equal")
    if not (q.device == k.device == v.device):
        raise KernelError(f"{qn}/{kn}/{vn} devices {q.device}/{k.device}/{v.device}: must all be equal")
    D = q.shape[-1]
    if kernel and D not in SUPPORTED_HEAD_DIMS:
        raise KernelError(f"head_dim={D} (q.shape[-1]): supported head dims are {SUPPORTED_HEAD_DIMS}; "
                          "use the reference implementation for other sizes")
    if k.shape[-1] != D or v.shape[-1] != D:
        raise KernelError(f"{kn}/{vn} head dims {k.shape[-1]}/{v.shape[-1]}: must equal q's head dim {D}")
    if k.shape != v.shape:
        raise KernelError(f"{kn}.shape={tuple(k.shape)} != {vn}.shape={tuple(v.shape)}")
    B, Hq = q.shape[0], q.shape[1]
    if k.shape[0] != B:
        raise KernelError(f"{kn}.shape[0]={k.shape[0]}: batch must equal {qn}.shape[0]={B}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise KernelError(f"query heads {Hq} and kv heads {Hkv}: query heads must be a multiple of kv heads")


def check_vec(t, name: str, B: int, device, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelError(f"{name}: expected a torch.Tensor of shape ({B},), got {type(t).__name__}")
    if t.shape != (B,):
        raise KernelError(f"{name}.shape={tuple(t.shape)}: expected ({B},), one entry per sequence")
    if t.dtype not in dtypes:
        raise KernelError(f"{name}.dtype={t.dtype}: expected one of {[str(d) for d in dtypes]}")
    if t.device != device:
        raise KernelError(f"{name}.device={t.device}: must be on the attention inputs' device {device}")


ROUTE_DTYPES = (torch.bool, torch.int8, torch.uint8, torch.int32, torch.int64)
LEN_DTYPES = (torch.int32, torch.int64)


def check_padded_prefill(q, k, v, route, kv_lens, q_lens, kv_start=None, **pattern_args) -> Pattern:
    """Checks of the padded (B, H, T, D) prefill entry points; returns the resolved pattern."""
    check_qkv(q, k, v)
    B = q.shape[0]
    check_vec(route, "route", B, q.device, ROUTE_DTYPES)
    check_vec(kv_lens, "kv_lens", B, q.device, LEN_DTYPES)
    check_vec(q_lens, "q_lens", B, q.device, LEN_DTYPES)
    if kv_start is not None:
        check_vec(kv_start, "kv_start", B, q.device, LEN_DTYPES)
    return resolve_pattern(**pattern_args)


# ------------------------------------------------------------------------------ ring-buffer KV cache


def ring_capacity(*, sink: int, window: int, block: int, block_exact: bool) -> int:
    """Slots of an SA layer's ring-buffer cache: sink + window in both modes (block-exact requires
    sink and window to be multiples of block, so the sink blocks and window blocks fill it)."""
    pat = resolve_pattern(sink=sink, window=window, block=block, block_exact=block_exact)
    return pat.sink_end + pat.window


def ring_slot(r: torch.Tensor, *, sink: int, window: int, block: int, block_exact: bool) -> torch.Tensor:
    """Slot of real key index ``r`` (any int tensor, >= 0; elementwise, on r's device, no host sync).

    token-exact: r < sink -> r; else sink + (r - sink) % window.
    block-exact (b = block, sb = sink // b, wb = window // b): r < sb*b -> r; else, with kb = r // b,
    sb*b + ((kb - sb) % wb) * b + r % b.
    Writing key r of a sequence to slot ring_slot(r) (r = 0, 1, ...) keeps exactly the keys that an
    SA decode query may still attend (see ``attention.routed_decode_ring``)."""
    pat = resolve_pattern(sink=sink, window=window, block=block, block_exact=block_exact)
    r = r.to(torch.int64)
    s0 = pat.sink_end
    rw = torch.clamp(r - s0, min=0)  # index past the sinks
    if pat.block_exact:
        b = pat.block
        win = s0 + torch.remainder(torch.div(rw, b, rounding_mode="floor"), pat.window_blocks) * b + torch.remainder(rw, b)
    else:
        win = s0 + torch.remainder(rw, pat.window)
    return torch.where(r < s0, r, win)
