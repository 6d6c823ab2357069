"""Errors raised by the attention kernels.

``KernelError`` derives from ``ValueError`` so callers that do not know this package can still catch
it; the package above (``fluxc``) may wrap it in its own error type.  Every message names the
argument, the value that was given and what to do instead.
"""

from __future__ import annotations


class KernelError(ValueError):
    """A kernel was called with arguments it does not support."""
