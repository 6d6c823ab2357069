"""Exceptions raised by fluxc. Every user-facing error is a :class:`FluxError` subclass whose message
names the argument, the value and the fix."""

from __future__ import annotations


class FluxError(Exception):
    """Base class of every error fluxc raises on purpose."""


class ConfigError(FluxError, ValueError):
    """An option, config field or argument has a value fluxc cannot use."""


class NoAttentionError(FluxError):
    """The traced graph holds no attention site fluxc recognises."""


class RouteError(FluxError, ValueError):
    """A requested route cannot be applied (wrong length, unknown value, or a site kept as-is)."""


class CheckpointError(FluxError):
    """A router checkpoint cannot be read."""


class CheckpointMismatchError(CheckpointError):
    """A router checkpoint was made for another model or another sparse configuration."""


class CorruptCheckpointError(CheckpointError):
    """A router checkpoint file is damaged or incomplete."""


class ImplementationError(FluxError):
    """An explicitly requested implementation cannot run here (no silent fallback)."""


class NotTracedError(FluxError):
    """Information that exists only after the model has been traced was asked for too early."""


class ExportError(FluxError):
    """A model, route, opset or input cannot be exported as asked."""


class MaskError(FluxError, ValueError):
    """The model's attention mask has a form the chosen implementation cannot serve."""


class CapacityError(FluxError):
    """The decode engine's KV pages or batch slots cannot hold a request (raise num_pages / max_batch)."""


class RequestError(FluxError):
    """One request of a batch failed (its own error attached); the batch's other requests are unaffected."""


class RecompileLimitError(FluxError):
    """A compiled model met more input layouts than Dynamo's recompile limit allows."""
