"""Dispatch from `fluxc::routed_attention` to the GPU kernels of `fluxc.kernels`.

The kernels take structural masks: causal + per-sequence key ranges. That is `is_causal` alone, or `is_causal`
with the key mask (B, 1, 1, Tk) of a mask the pass read as structure (`fluxc::causal_positions` checked that its
real keys are contiguous). A site whose mask is a materialised (Tq, Tk) tensor is not handed to them: `auto`
runs the reference and logs why; an explicit `impl` raises.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import Tensor

from fluxc.errors import ImplementationError
from fluxc.kernels import attention as triton_kernels
from fluxc.kernels import fa4 as fa4_kernels
from fluxc.kernels import flex as flex_kernels
from fluxc.spec import SiteSpec

log = logging.getLogger("fluxc")

# From this many query tokens on, `auto` prefill reads the batch's routes on the host (one sync per layer) so
# that an all-full batch runs the library kernel (cuDNN, else flash); below it the sync would cost more than the
# Triton kernel loses (on the H200 at 32K: 17.7 ms Triton against 14.5 ms cuDNN).
HOST_DISPATCH_MIN_TOKENS = 8192


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: the Triton kernels then run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation that will run for `impl` on `device`; explicit requests never fall back."""
    if impl == "reference":
        return "reference"
    if impl in ("triton", "flex"):
        if device.type != "cuda" and not (impl == "triton" and interpreting()):
            raise ImplementationError(
                f"impl={impl!r} needs CUDA tensors but got device {device}; use impl='reference' or 'auto' "
                f"(the Triton kernels run on CPU only under TRITON_INTERPRET=1)")
        return impl
    if impl == "fa4":
        why = fa4_kernels.unavailable_reason(device)
        if why is not None:
            raise ImplementationError(f"impl='fa4' cannot run: {why}; use impl='auto' (picks flash-attn-4 where it "
                                      f"runs, logged) or impl='triton'")
        return "fa4"
    if impl == "auto":
        if device.type != "cuda":
            return "reference"
        return _auto_kernels(device.index if device.index is not None else torch.cuda.current_device())
    raise ImplementationError(f"impl={impl!r} is unknown; use 'auto', 'reference', 'triton', 'flex' or 'fa4'")


@functools.cache
def _auto_kernels(index: int) -> str:
    """`auto`'s kernels on CUDA device `index`, chosen once per device and logged with the reason."""
    device = torch.device("cuda", index)
    why = fa4_kernels.unavailable_reason(device)
    if why is None:
        log.info("fluxc: impl='auto' on %s: flash-attn-4 runs prefill batches routed all-full, the Triton kernels "
                 "the others and decode", torch.cuda.get_device_name(device))
        return "fa4"
    log.info("fluxc: impl='auto' on %s: the Triton kernels (not flash-attn-4: %s)", torch.cuda.get_device_name(device),
             why)
    return "triton"


def is_key_mask(attn_mask: Tensor | None, is_causal: bool) -> bool:
    """True for a structural mask: `is_causal` with a bool key mask (B, 1, 1, Tk)."""
    return (attn_mask is not None and is_causal and attn_mask.dtype == torch.bool and attn_mask.dim() == 4
            and attn_mask.shape[1] == 1 and attn_mask.shape[2] == 1)


def _operand_reason(q: Tensor, explicit: bool) -> str | None:
    """The kernels' head dims and dtypes. float32 runs only where asked for (`explicit`): `auto` keeps float32
    models on the reference, whose matmuls are full float32."""
    head_dim = q.shape[3]
    if head_dim not in (64, 128):
        return f"head_dim={head_dim} (kernels take 64 or 128)"
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if explicit else (torch.float16, torch.bfloat16)
    if q.dtype not in dtypes:
        return f"dtype {q.dtype} (kernels take {', '.join(str(d).split('.')[-1] for d in dtypes)})"
    return None


def unsupported_reason(q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool,
                       bottom_right: bool = False, explicit: bool = False) -> str | None:
    """Why the kernels cannot run this call, or None when they can."""
    why = _operand_reason(q, explicit)
    if why is not None:
        return why
    q_len, kv_len = q.shape[2], k.shape[2]
    if is_key_mask(attn_mask, is_causal):
        return None
    if attn_mask is not None:
        return "the site passes a materialised mask (kernels take causal + lengths)"
    if q_len > 1 and not (is_causal and (bottom_right or q_len == kv_len)):
        return "prefill without is_causal over the whole key range"
    if q_len == 1 and is_causal and not bottom_right and kv_len > 1:
        return "SDPA's top-left is_causal with one query sees only the first key"
    return None


def host_dispatch(q: Tensor, explicit: bool, dense: str = "PyTorch SDPA (cuDNN, else flash)") -> bool:
    """Whether `auto` prefill may read routes on the host to hand an all-full batch to the `dense` library kernel:
    long prompts, CUDA, and no graph capture in progress (a sync cannot be captured)."""
    if explicit or q.shape[2] < HOST_DISPATCH_MIN_TOKENS or q.device.type != "cuda":
        return False
    if torch.cuda.is_current_stream_capturing():
        return False
    _log_host_dispatch_once(dense)
    return True


@functools.cache
def _log_host_dispatch_once(dense: str) -> None:
    log.info("fluxc: impl='auto' prefill of %d+ tokens reads the routes on the host (one sync per layer); a batch "
             "routed all-full runs %s, the others the Triton kernel", HOST_DISPATCH_MIN_TOKENS, dense)


def _decline(impl: str, why: str, explicit: bool, what: str, op: str) -> None:
    """An explicit `impl` that cannot run raises; `auto` logs why the reference runs instead."""
    if explicit:
        raise ImplementationError(f"impl={impl!r} cannot run {what}: {why}; use impl='auto' "
                                  f"(falls back to the reference, logged) or impl='reference'")
    log.info("fluxc: %s runs the reference implementation: %s", op, why)
    return None


def run_kernel(impl: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, route: Tensor, qpos: Tensor,
               key_start: Tensor, spec: SiteSpec, *, explicit: bool) -> Tensor | None:
    """Run `impl` ("triton" | "flex" | "fa4") or return None after logging why the reference must run instead."""
    why = unsupported_reason(q, k, attn_mask, spec.is_causal, spec.bottom_right, explicit)
    if why is not None:
        return _decline(impl, why, explicit, "this attention site", "routed attention")
    batch, _, q_len, _ = q.shape
    kv_len = k.shape[2]
    common = dict(scale=spec.scale, softcap=spec.softcap, native_window=spec.native_window, **spec.rule)
    if is_key_mask(attn_mask, spec.is_causal):
        if impl == "flex":
            return _decline(impl, "the FlexAttention lowering takes no key ranges (left padding)", explicit,
                            "this attention site", "routed attention")
        # consecutive query positions (the pass proved both index vectors are aranges): the last query sits at
        # key qpos[:, -1], so the keys are [key_start, qpos[:, -1]] and the queries the last q_len of them
        kv_lens = (qpos[:, -1] + 1).clamp(min=q_len).to(torch.int32)  # (B,)
        common["kv_start"] = key_start
    else:
        kv_lens = torch.full((batch,), kv_len, dtype=torch.int32, device=q.device)
    if impl in ("triton", "fa4"):  # fa4 decodes on the Triton kernels (no split-KV in flash-attn-4 on SM90)
        routed_prefill, routed_decode = triton_kernels.routed_prefill, triton_kernels.routed_decode
        if impl == "fa4" and explicit and q_len > 1 and torch.cuda.is_current_stream_capturing():
            raise ImplementationError("impl='fa4' reads the batch's routes on the host at prefill, which a CUDA graph "
                                      "cannot capture; capture decode only, or use impl='triton' for a captured "
                                      "prefill")
        if impl == "fa4" and (explicit or host_dispatch(q, explicit, "flash-attn-4")):
            routed_prefill = fa4_kernels.routed_prefill_fa4
        elif impl == "triton" and host_dispatch(q, explicit):
            routed_prefill = triton_kernels.routed_prefill_dispatch
    else:
        routed_prefill, routed_decode = flex_kernels.routed_prefill_flex, flex_kernels.routed_decode_flex
    if q_len == 1:
        return routed_decode(q, k, v, route, kv_lens, **common)
    q_lens = torch.full((batch,), q_len, dtype=torch.int32, device=q.device)
    return routed_prefill(q, k, v, route, kv_lens, q_lens, pattern=spec.pattern, n_last=spec.n_last, **common)


def run_cache_kernel(impl: str, q: Tensor, k_store: Tensor, v_store: Tensor, lengths: Tensor, route: Tensor, *,
                     ring: bool, spec: SiteSpec, explicit: bool) -> Tensor | None:
    """Decode over the engine's compacted cache (`ring`: an SA layer's ring) with the Triton kernels, or None
    after logging why not."""
    why = unsupported_reason(q[:, :, :1], k_store, None, False, explicit=explicit)
    if why is None and impl == "flex":
        why = "the FlexAttention lowering has no compacted-cache decode"
    if why is not None:
        return _decline(impl, why, explicit, "this decode step", "cache attention")
    kv_lens = lengths.to(torch.int32)
    common = dict(scale=spec.scale, softcap=spec.softcap, **spec.rule)
    if ring:
        return triton_kernels.routed_decode_ring(q, k_store, v_store, kv_lens, **common)
    return triton_kernels.routed_decode(q, k_store, v_store, route, kv_lens, **common)


def run_paged_kernel(impl: str, q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seq_lens: Tensor,
                     route: Tensor, spec: SiteSpec, *, explicit: bool) -> Tensor | None:
    """Decode over the paged cache with the Triton kernel, or None after logging why not."""
    why = _operand_reason(q, explicit)
    if why is None and impl == "flex":
        why = "the FlexAttention lowering has no paged decode"
    if why is not None:
        return _decline(impl, why, explicit, "this decode step", "paged attention")
    return triton_kernels.routed_decode_paged(q, k_pages, v_pages, block_table.to(torch.int32), seq_lens, route,
                                              scale=spec.scale, softcap=spec.softcap, **spec.rule)
