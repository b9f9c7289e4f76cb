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
    UsageDelta,
    UsageStore,
    UsageTotals,
    validate_workspace,
)
from tokmeter.backends.jsonkv import JsonUsageStore
from tokmeter.backends.mongo import MongoUsageStore
from tokmeter.backends.postgres import PostgresUsageStore

from tokmeter.errors import StoreError

__all__ = [
    "GROUP_BY_CHOICES",
    "DocumentUsage",
    "JsonUsageStore",
    "MongoUsageStore",
    "PostgresUsageStore",
    "UsageDelta",
    "UsageStore",
    "UsageTotals",
    "open_store",
    "store_for_rag",
    "validate_workspace",
]


_RAG_STORES: dict[str, Any] = {
    "JsonDocStatusStorage": JsonUsageStore,
    "PGDocStatusStorage": PostgresUsageStore,
    "MongoDocStatusStorage": MongoUsageStore,
}


def store_for_rag(rag: Any) -> UsageStore:
    """The usage store matching a LightRAG instance's doc-status storage.

    The store shares LightRAG's own storage object (and its connection pool or
    client), and never closes it.
    """
    kind = type(rag.doc_status).__name__
    store_class = _RAG_STORES.get(kind)
    if store_class is None:
        raise StoreError(
            f"tokmeter has no usage store for LightRAG's {kind}; supported: "
            f"{', '.join(_RAG_STORES)}"
        )
    store: UsageStore = store_class.from_rag(rag)
    return store


def open_store(location: str, *, workspace: str = "", **options: Any) -> UsageStore:
    """Build a store from a location string (connects on ``open()`` / ``async with``).

    - ``json:DIR`` (or a plain directory path): LightRAG's JSON doc-status store in
      its ``working_dir`` ``DIR``.
    - ``postgresql://...`` or ``postgres://...``: LightRAG's ``LIGHTRAG_DOC_STATUS``
      table (:class:`PostgresUsageStore`; ``""`` is LightRAG's ``"default"`` workspace).
    - ``mongodb://...`` or ``mongodb+srv://...``: LightRAG's ``{workspace}_doc_status``
      collection (:class:`MongoUsageStore`); pass ``database=`` (default
      ``$MONGO_DATABASE`` or ``"LightRAG"``, as LightRAG does).

    ``options`` go to the store's constructor (e.g. ``connect_timeout``,
    ``require_workspace``). An unreachable server raises
    :class:`~tokmeter.errors.StoreUnavailableError` when the store is opened.
    """
    if location.startswith("json:"):
        return JsonUsageStore(location[len("json:"):], workspace)
    if "://" not in location:
        return JsonUsageStore(location, workspace)
    scheme = location.split("://", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        return PostgresUsageStore(location, workspace, **options)
    if scheme in ("mongodb", "mongodb+srv"):
        return MongoUsageStore(location, workspace, **options)
    raise StoreError(
        f"unsupported store location scheme {scheme!r}; use json:DIR, postgresql://... "
        "or mongodb://..."
    )
