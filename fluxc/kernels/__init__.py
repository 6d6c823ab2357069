"""Routed-attention kernels for fluxc (installed as ``fluxc.kernels``).

Importing this package imports neither Triton nor the kernels: ``attention`` (hand-written Triton),
``flex`` (the FlexAttention lowering, Inductor generates the Triton) and ``reference`` (plain
PyTorch, the semantics) are plain submodules that import their heavy dependencies inside functions.

Public entry points::

    from fluxc.kernels.attention import routed_prefill, routed_decode, routed_prefill_varlen
    from fluxc.kernels.attention import routed_decode_ring, ring_slot, ring_capacity  # evicted SA cache
    from fluxc.kernels.flex import routed_prefill_flex, routed_decode_flex
    from fluxc.kernels.reference import routed_attention_reference, routed_decode_reference
    from fluxc.kernels.reference import routed_decode_ring_reference
"""

from __future__ import annotations

from .errors import KernelError

__all__ = ["KernelError"]
