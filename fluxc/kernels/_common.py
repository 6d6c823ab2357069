"""Argument checks and pattern parameters shared by the Triton kernels, the FlexAttention lowering
and the reference.  Imports torch only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fluxc import patterns
from fluxc.patterns import pattern_problem

from .errors import KernelError

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Pattern:
    """Resolved sparse-attention pattern (what the kernels need as integers)."""

    sink_end: int  # keys [0, sink_end) are sinks
    window: int  # the window in tokens (whole blocks when block_exact)
    block: int  # block size of the block-exact rule
    block_exact: bool
    triangle: bool
    n_last: int
    native_window: int
    softcap: float


def resolve_pattern(*, sink: int, window: int, block: int, block_exact: bool, pattern: str = "streaming",
                    n_last: int = 0, softcap: float = 0.0, native_window: int = 0) -> Pattern:
    problem = pattern_problem(pattern=pattern, sink=sink, window=window, block=block if block_exact else max(block, 1),
                              block_exact=block_exact, n_last=n_last)
    if problem is not None:
        raise KernelError(problem)
    if isinstance(native_window, bool) or not isinstance(native_window, int) or native_window < 0:
        raise KernelError(f"native_window={native_window!r}: expected a Python int >= 0")
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise KernelError(f"softcap={softcap!r}: expected a float >= 0 (0 disables soft-capping)")
    return Pattern(sink_end=sink, window=window, block=max(block, 1), block_exact=block_exact,
                   triangle=pattern == "triangle", n_last=n_last, native_window=native_window, softcap=float(softcap))


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
    """Slots of an SA layer's ring-buffer cache (``fluxc.patterns.ring_capacity``)."""
    pat = resolve_pattern(sink=sink, window=window, block=block, block_exact=block_exact)
    return patterns.ring_capacity(pat.sink_end, pat.window)


def ring_slot(r: torch.Tensor, *, sink: int, window: int, block: int, block_exact: bool) -> torch.Tensor:
    """Slot of real key index ``r`` (any int tensor, >= 0; elementwise, on r's device, no host sync), as
    ``fluxc.patterns.ring_slot`` lays the ring out: writing key r of a sequence to slot ring_slot(r)
    (r = 0, 1, ...) keeps exactly the keys that an SA decode query may still attend."""
    pat = resolve_pattern(sink=sink, window=window, block=block, block_exact=block_exact)
    r = r.to(torch.int64)
    return torch.where(r < pat.sink_end, r, patterns.ring_slot(r, pat.sink_end, pat.window))


def host_batch_facts(q, k, route, kv_lens, q_lens, kv_start=None) -> tuple[bool, bool, bool]:
    """(every sequence routed full, no right padding, no left padding) of a padded prefill batch, read on the host
    in ONE device sync: what lets a library kernel take the batch (never callable under CUDA-graph capture)."""
    rows = [route.to(torch.int64) != 0, kv_lens.to(torch.int64) == k.shape[2], q_lens.to(torch.int64) == q.shape[2]]
    if kv_start is not None:
        rows.append(kv_start.to(torch.int64) == 0)
    host = torch.stack(rows).cpu()  # (3 or 4, B)
    return bool(host[0].all()), bool(host[1:3].all()), kv_start is None or bool(host[3].all())
