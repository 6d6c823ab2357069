"""flash-attn-4 (the CuTe-DSL FlashAttention of PyPI ``flash-attn-4``) as the full branch of routed prefill: the
``"fa4"`` implementation.

On Hopper (SM90) and Blackwell (SM100) flash-attn-4's dense causal kernel is faster than cuDNN's, so a prefill
whose batch is routed all-full runs it (native GQA, right padding through ``seqused_q`` / ``seqused_k``, the
model's soft-cap and sliding window). Any other batch -- a sparse or mixed route, or left-padded keys -- runs
fluxc's routed Triton kernel in one launch, as does decode (flash-attn-4 has no split-KV on SM90, so one
sequence's decode would run at a tenth of the bandwidth floor). Reading the route is one host sync per layer:
prefill only, never under CUDA-graph capture.

Importing this module imports neither flash-attn-4 nor Triton.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from . import attention as triton_kernels
from . import flex as flex_kernels
from ._common import check_padded_prefill, host_batch_facts
from .errors import KernelError

__all__ = ["unavailable_reason", "full_prefill_fa4", "routed_prefill_fa4"]

# compute capabilities flash-attn-4's forward kernels are built for: Hopper, Blackwell
ARCHES = (9, 10)


@functools.cache
def _importable() -> str | None:
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:  # a `flash_attn` without the `cute` subpackage (flash-attn 2)
        found = False
    if not found:
        return "flash_attn.cute is not importable: install flash-attn-4 (pip install 'fluxc[fa4]')"
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """Why flash-attn-4 cannot run on `device`, or None when it can."""
    if device.type != "cuda":
        return f"device {device} is not a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in ARCHES:
        return (f"{torch.cuda.get_device_name(device)} is SM{major}{minor}; flash-attn-4 runs on SM90 (Hopper) and "
                f"SM100 (Blackwell)")
    return _importable()


def full_prefill_fa4(q, k, v, kv_lens=None, q_lens=None, *, scale: float, softcap: float = 0.0,
                     native_window: int = 0) -> torch.Tensor:
    """Causal attention (the full branch) of every sequence on flash-attn-4.

    q (B, Hq, Tq, D), k / v (B, Hkv, Tk, D) as the routed op holds them. `kv_lens` / `q_lens` (B,) int32 or None
    (no padding): sequence b's keys are k[b, :, :kv_lens[b]] and its queries q[b, :, :q_lens[b]], the last
    q_lens[b] of its keys (bottom-right causal, as flash-attn aligns them); padding query rows come out zero.
    Both lengths or neither.
    Returns (B, Hq, Tq, D)."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, T, H, D) views: flash-attn's layout, no copy
    window = (native_window - 1, 0) if native_window else (None, None)
    common = dict(softmax_scale=float(scale), causal=True, window_size=window, softcap=float(softcap))
    if kv_lens is None:
        out = flash_attn_func(qt, kt, vt, **common)[0]  # (B, Tq, Hq, D)
    else:
        used_q, used_k = (x.to(torch.int32).contiguous() for x in (q_lens, kv_lens))
        out = flash_attn_varlen_func(qt, kt, vt, seqused_q=used_q, seqused_k=used_k, **common)[0]
        rows = torch.arange(q.shape[2], device=q.device)[None, :, None, None] < used_q[:, None, None, None]  # (B, Tq, 1, 1)
        out = out.masked_fill(~rows, 0)  # rows past q_lens[b] are not written by the kernel
    return out.transpose(1, 2).contiguous()  # (B, Hq, Tq, D)


def routed_prefill_fa4(q, k, v, route, kv_lens, q_lens, *, scale: float, sink: int, window: int, block: int,
                       block_exact: bool, pattern: str, n_last: int, softcap: float = 0.0, native_window: int = 0,
                       kv_start=None, sparse: str = "triton") -> torch.Tensor:
    """Same contract as ``attention.routed_prefill``. Reads route and lengths on the host (one sync): a batch
    routed all-full without left padding runs `full_prefill_fa4`, any other the routed Triton kernel, or with
    ``sparse="flash"`` (no left padding, no soft-cap) FlexAttention on flash-attn-4's kernel: the routed mask_mod
    and its closed-form block lists, compiled once for every length (`flex.routed_prefill_flex`)."""
    if sparse not in ("triton", "flash"):
        raise KernelError(f"sparse={sparse!r}: use 'triton' or 'flash'")
    check_padded_prefill(q, k, v, route, kv_lens, q_lens, kv_start, sink=sink, window=window, block=block,
                         block_exact=block_exact, pattern=pattern, n_last=n_last, softcap=softcap,
                         native_window=native_window)
    all_full, unpadded, no_left_padding = host_batch_facts(q, k, route, kv_lens, q_lens, kv_start)
    if all_full and no_left_padding:
        lengths = (None, None) if unpadded else (kv_lens, q_lens)
        return full_prefill_fa4(q, k, v, *lengths, scale=scale, softcap=softcap, native_window=native_window)
    if sparse == "flash" and no_left_padding and softcap == 0.0:
        return flex_kernels.routed_prefill_flex(q, k, v, route, kv_lens, q_lens, scale=scale, sink=sink,
                                                window=window, block=block, block_exact=block_exact, pattern=pattern,
                                                n_last=n_last, native_window=native_window, backend="FLASH",
                                                dynamic=True)
    return triton_kernels.routed_prefill(q, k, v, route, kv_lens, q_lens, scale=scale, sink=sink, window=window,
                                         block=block, block_exact=block_exact, pattern=pattern, n_last=n_last,
                                         softcap=softcap, native_window=native_window, kv_start=kv_start)
