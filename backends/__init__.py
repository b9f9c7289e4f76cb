"""Usage stores: read, write and aggregate ``metadata["token_usage"]`` in LightRAG's
doc-status stores, with or without a running LightRAG.

Every store implements :class:`UsageStore`. Pick one with :func:`store_for_rag`
(from a LightRAG instance) or :func:`open_store` (from a location string).
"""

from __future__ import annotations

from typing import Any

from tokmeter.backends._base import (
    GROUP_BY_CHOICES,
    DocumentUsage,
    UsageStore,
    UsageTotals,
    validate_workspace,
)
from tokmeter.backends.jsonkv import JsonUsageStore

from tokmeter.errors import StoreError

__all__ = [
    "GROUP_BY_CHOICES",
    "DocumentUsage",
    "JsonUsageStore",
    "UsageStore",
    "UsageTotals",
    "open_store",
    "store_for_rag",
    "validate_workspace",
]


def store_for_rag(rag: Any) -> UsageStore:
    """The usage store matching a LightRAG instance's doc-status storage."""
    kind = type(rag.doc_status).__name__
    if kind == "JsonDocStatusStorage":
        return JsonUsageStore.from_rag(rag)
    raise StoreError(
        f"tokmeter has no usage store for LightRAG's {kind}; supported: JsonDocStatusStorage"
    )


def open_store(location: str, *, workspace: str = "", **options: Any) -> UsageStore:
    """Build a store from a location string.

    ``json:DIR`` (or a plain directory path) opens LightRAG's JSON doc-status store
    in its ``working_dir`` ``DIR``.
    """
    if location.startswith("json:"):
        return JsonUsageStore(location[len("json:"):], workspace)
    if "://" not in location:
        return JsonUsageStore(location, workspace)
    scheme = location.split("://", 1)[0]
    raise StoreError(f"unsupported store location scheme {scheme!r}; use json:DIR")
