"""Exceptions raised by tokmeter (metering itself never raises into LightRAG)."""

from __future__ import annotations

__all__ = [
    "IncompatibleLightRAGError",
    "InstrumentationError",
    "InvalidWorkspaceError",
    "StoreError",
    "StoreUnavailableError",
    "TokmeterError",
    "UnknownWorkspaceError",
]


class TokmeterError(Exception):
    """Base class of tokmeter's errors."""


class IncompatibleLightRAGError(TokmeterError):
    """The installed LightRAG is outside the version range tokmeter supports."""


class InstrumentationError(TokmeterError):
    """A LightRAG instance cannot be metered (wrong object, failed self-test)."""


class StoreError(TokmeterError):
    """A usage store was misconfigured or a store operation failed."""


class StoreUnavailableError(StoreError):
    """The store's server or directory cannot be reached."""


class InvalidWorkspaceError(StoreError, ValueError):
    """A workspace name is not allowed (empty parts, path separators, control characters)."""


class UnknownWorkspaceError(StoreError):
    """The store has no doc-status data for the requested workspace."""
