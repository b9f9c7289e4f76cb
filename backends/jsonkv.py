"""Usage in LightRAG's JSON KV doc-status store (``kv_store_doc_status.json``).

All access goes through LightRAG's own ``JsonDocStatusStorage`` and its lock, so it
is safe beside a running LightRAG in the same process, and the file is always
written by LightRAG's own atomic writer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokmeter.backends._base import (
    DocumentUsage,
    UsageDelta,
    UsageStore,
    UsageTotals,
    aggregate_records,
    document_from_row,
    usage_from_metadata,
)

from tokmeter._record import UsageRecord
from tokmeter.errors import StoreUnavailableError, UnknownWorkspaceError

DOC_STATUS_FILE = "kv_store_doc_status.json"


class JsonUsageStore(UsageStore):
    """Usage stored by LightRAG's ``JsonDocStatusStorage``.

    Build it from a running instance with :meth:`from_rag`, or standalone from
    LightRAG's ``working_dir`` and a workspace::

        async with JsonUsageStore("./rag_storage", workspace="acme") as store:
            record = await store.get_usage("doc-123")
    """

    backend = "json"

    def __init__(self, working_dir: str | os.PathLike[str], workspace: str = "", *,
                 storage: Any = None) -> None:
        super().__init__(workspace)
        self.working_dir = Path(working_dir)
        self._storage = storage
        self._owns_storage = storage is None

    @classmethod
    def from_rag(cls, rag: Any) -> JsonUsageStore:
        """The store of a LightRAG instance configured with ``JsonDocStatusStorage``."""
        storage = rag.doc_status
        return cls(storage.global_config["working_dir"], storage.workspace or "", storage=storage)

    @property
    def file(self) -> Path:
        base = self.working_dir / self.workspace if self.workspace else self.working_dir
        return base / DOC_STATUS_FILE

    async def open(self) -> None:
        if self._storage is not None:
            return
        if not self.working_dir.is_dir():
            raise StoreUnavailableError(
                f"JSON store directory {str(self.working_dir)!r} does not exist"
            )
        if not self.file.is_file():
            raise UnknownWorkspaceError(
                f"no LightRAG doc-status data for workspace {self.workspace!r} in "
                f"{str(self.working_dir)!r} (expected {str(self.file)!r})"
            )
        from lightrag.kg.json_doc_status_impl import JsonDocStatusStorage
        from lightrag.kg.shared_storage import initialize_share_data

        initialize_share_data()
        storage = JsonDocStatusStorage(
            namespace="doc_status",
            workspace=self.workspace,
            global_config={"working_dir": str(self.working_dir)},
            embedding_func=None,
        )
        await storage.initialize()
        self._storage = storage

    async def close(self) -> None:
        if self._owns_storage and self._storage is not None:
            await self._storage.finalize()
            self._storage = None

    async def _rows(self) -> list[tuple[str, dict[str, Any]]]:
        await self.open()
        storage = self._storage
        async with storage._storage_lock:
            return [(k, dict(v)) for k, v in storage._data.items() if isinstance(v, dict)]

    def _document(self, doc_id: str, row: dict[str, Any]) -> DocumentUsage:
        return document_from_row(doc_id, self.workspace, row, row.get("metadata"))

    async def _get(self, doc_id: str) -> DocumentUsage | None:
        await self.open()
        row = await self._storage.get_by_id(doc_id)
        return self._document(doc_id, row) if isinstance(row, dict) else None

    async def _list_track(self, track_id: str) -> list[DocumentUsage]:
        rows = await self._rows()
        return [self._document(k, r) for k, r in rows if r.get("track_id") == track_id]

    async def _change_usage(
        self, doc_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | bool]
    ) -> bool:
        """Replace a document's token_usage with ``change(stored)`` under LightRAG's lock.

        ``change`` returns the new record, or a bool to leave the row alone and return
        that. Read-modify-write under the storage's own lock is atomic for this
        process, the only writer a JSON store can have.
        """
        await self.open()
        from lightrag.kg.shared_storage import set_all_update_flags

        storage = self._storage
        async with storage._storage_lock:
            row = storage._data.get(doc_id)
            if not isinstance(row, dict):
                return False
            metadata = row.get("metadata")
            metadata = dict(metadata) if isinstance(metadata, dict) else {}
            stored = metadata.get("token_usage")
            if not isinstance(stored, dict):
                return False
            changed = change(stored)
            if isinstance(changed, bool):
                return changed
            metadata["token_usage"] = changed
            storage._data[doc_id] = {**row, "metadata": metadata}
            await set_all_update_flags(storage.namespace, workspace=storage.workspace)
        await storage.index_done_callback()
        return True

    async def _write(self, doc_id: str, record: UsageRecord) -> bool:
        def newer(stored: dict[str, Any]) -> dict[str, Any] | bool:
            if stored.get("run_id") != record.run_id:
                return False
            if int(stored.get("revision") or 0) >= record.revision:
                return True
            return record.to_dict()

        return await self._change_usage(doc_id, newer)

    async def _merge_delta(self, doc_id: str, delta: UsageDelta, run_id: str | None) -> bool:
        def added(stored: dict[str, Any]) -> dict[str, Any] | bool:
            if run_id is not None and stored.get("run_id") != run_id:
                return False
            return delta.apply(stored)

        return await self._change_usage(doc_id, added)

    async def _aggregate(self, since: int | None, until: int | None, group_by: str | None,
                         track_id: str | None) -> list[UsageTotals]:
        rows = [(row.get("track_id"), usage_from_metadata(row.get("metadata")))
                for _, row in await self._rows()]
        return aggregate_records(rows, since=since, until=until, group_by=group_by,
                                 track_id=track_id)

    async def _workspace_exists(self) -> bool:
        if self._storage is not None and not self._owns_storage:
            return True
        return self.file.is_file()
