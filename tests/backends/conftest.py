"""Backends under the contract suite. To add a backend, add a :class:`Backend` subclass
and its name to :data:`BACKENDS`: every contract test then runs against it.

Documents are always seeded through LightRAG's own doc-status storage classes, so the
suite checks the stores against the layout LightRAG really writes.
"""

from __future__ import annotations

import abc
import datetime as dt
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from tokmeter.backends import (
    JsonUsageStore,
    MongoUsageStore,
    PostgresUsageStore,
    UsageStore,
    store_for_rag,
    validate_workspace,
)

from tests.conftest import require_server
from tokmeter.errors import InvalidWorkspaceError

BACKENDS = ("json", "postgres", "mongo")

#: ``created_at`` / ``updated_at`` of seeded documents.
SEEDED_AT = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc).isoformat()


def doc_status(
    track_id: str | None,
    token_usage: dict[str, Any] | None,
    *,
    metadata: dict[str, Any] | None = None,
    status: str = "processed",
    file_path: str = "report.pdf",
) -> dict[str, Any]:
    """A doc-status row as LightRAG's pipeline writes it."""
    meta = dict(metadata if metadata is not None else other_metadata())
    if token_usage is not None:
        meta["token_usage"] = token_usage
    return {
        "status": status,
        "content_summary": "summary",
        "content_length": 1234,
        "chunks_count": 3,
        "chunks_list": ["chunk-1", "chunk-2", "chunk-3"],
        "file_path": file_path,
        "track_id": track_id,
        "metadata": meta,
        "error_msg": None,
        "created_at": SEEDED_AT,
        "updated_at": SEEDED_AT,
    }


def other_metadata() -> dict[str, Any]:
    """Metadata keys LightRAG (or a user) keeps beside token_usage: must survive every write."""
    return {
        "parse_start_time": 1735787045,
        "processing_start_time": 1735787046,
        "processing_end_time": 1735787099,
        "note": "it's a \"quoted\" $value; DROP TABLE x; --",
        "nested": {"a.b": [1, 2, {"op": '{"$gt": ""}'}], "flag": True},
    }


class Backend(abc.ABC):
    """One doc-status store: seeds through LightRAG's storage, opens usage stores."""

    kind: str

    def __init__(self) -> None:
        self._storages: dict[str, Any] = {}
        self._seeded: dict[str, set[str]] = {}
        self._stores: list[UsageStore] = []

    # -- what a backend provides ----------------------------------------------
    @abc.abstractmethod
    def lightrag_storage(self, workspace: str) -> Any:
        """A (not yet initialized) LightRAG doc-status storage for ``workspace``."""

    @abc.abstractmethod
    def standalone_store(self, workspace: str) -> UsageStore:
        """The usage store a billing job opens without LightRAG."""

    @abc.abstractmethod
    async def containers_exist(self, workspaces: list[str]) -> bool:
        """Whether the tables / collections / files of ``workspaces`` still exist."""

    def refuses(self, workspace: str) -> bool:
        """Whether this backend must refuse ``workspace`` with InvalidWorkspaceError."""
        try:
            validate_workspace(workspace)
        except InvalidWorkspaceError:
            return True
        return False

    # -- shared ----------------------------------------------------------------
    async def storage(self, workspace: str) -> Any:
        """LightRAG's initialized storage for ``workspace`` (finalized at teardown)."""
        if workspace not in self._storages:
            from lightrag.kg.shared_storage import initialize_share_data

            initialize_share_data()  # LightRAG's locks; idempotent
            storage = self.lightrag_storage(workspace)
            await storage.initialize()
            self._storages[workspace] = storage
        return self._storages[workspace]

    async def seed(self, workspace: str, docs: dict[str, dict[str, Any]]) -> None:
        """Write doc-status rows through LightRAG's own ``upsert``."""
        storage = await self.storage(workspace)
        self._seeded.setdefault(workspace, set()).update(docs)
        await storage.upsert({k: dict(v) for k, v in docs.items()})
        await storage.index_done_callback()

    async def lightrag_row(self, workspace: str, doc_id: str) -> dict[str, Any] | None:
        """A row as LightRAG itself reads it back."""
        storage = await self.storage(workspace)
        row = await storage.get_by_id(doc_id)
        return dict(row) if row is not None else None

    async def store(self, workspace: str, *, via: str = "standalone") -> UsageStore:
        """An opened usage store (closed at teardown)."""
        if via == "rag":
            store = store_for_rag(SimpleNamespace(doc_status=await self.storage(workspace)))
        else:
            store = self.standalone_store(workspace)
        self._stores.append(store)
        await store.open()
        return store

    async def teardown(self) -> None:
        for store in self._stores:
            await store.close()
        for workspace, storage in self._storages.items():
            try:
                # Only what this test wrote: the default workspace is shared.
                await storage.delete(sorted(self._seeded.get(workspace, ())))
            finally:
                await storage.finalize()


class JsonBackend(Backend):
    kind = "json"

    def __init__(self, working_dir: Path) -> None:
        super().__init__()
        self.working_dir = working_dir

    def lightrag_storage(self, workspace: str) -> Any:
        from lightrag.kg.json_doc_status_impl import JsonDocStatusStorage

        return JsonDocStatusStorage(
            namespace="doc_status", workspace=workspace,
            global_config={"working_dir": str(self.working_dir)}, embedding_func=None,
        )

    def standalone_store(self, workspace: str) -> UsageStore:
        return JsonUsageStore(self.working_dir, workspace)

    async def containers_exist(self, workspaces: list[str]) -> bool:
        return all(JsonUsageStore(self.working_dir, w).file.is_file() for w in workspaces)

    async def teardown(self) -> None:
        for store in self._stores:
            await store.close()
        for storage in self._storages.values():
            await storage.finalize()  # tmp_path goes away by itself


class PostgresBackend(Backend):
    kind = "postgres"

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.dsn = dsn

    def lightrag_storage(self, workspace: str) -> Any:
        from lightrag.kg.postgres_impl import PGDocStatusStorage

        return PGDocStatusStorage(
            namespace="doc_status", workspace=workspace, global_config={}, embedding_func=None
        )

    def standalone_store(self, workspace: str) -> UsageStore:
        return PostgresUsageStore(self.dsn, workspace)

    async def containers_exist(self, workspaces: list[str]) -> bool:
        import asyncpg

        conn = await asyncpg.connect(self.dsn, timeout=5)
        try:
            if not await conn.fetchval("SELECT to_regclass('lightrag_doc_status') IS NOT NULL"):
                return False
            present = await conn.fetch(
                "SELECT DISTINCT workspace FROM LIGHTRAG_DOC_STATUS WHERE workspace = ANY($1)",
                [w or "default" for w in workspaces],
            )
            return len(present) == len({w or "default" for w in workspaces})
        finally:
            await conn.close()


class MongoBackend(Backend):
    kind = "mongo"

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri

    def lightrag_storage(self, workspace: str) -> Any:
        from lightrag.kg.mongo_impl import MongoDocStatusStorage

        return MongoDocStatusStorage(
            namespace="doc_status", workspace=workspace, global_config={}, embedding_func=None
        )

    @property
    def database(self) -> str:
        return os.environ["MONGO_DATABASE"]

    def standalone_store(self, workspace: str) -> UsageStore:
        return MongoUsageStore(self.uri, workspace, database=self.database)

    def refuses(self, workspace: str) -> bool:
        return super().refuses(workspace) or "$" in workspace

    async def containers_exist(self, workspaces: list[str]) -> bool:
        from pymongo import AsyncMongoClient

        client: Any = AsyncMongoClient(self.uri, serverSelectionTimeoutMS=5000)
        try:
            names = set(await client[self.database].list_collection_names())
        finally:
            await client.close()
        return all((f"{w}_doc_status" if w else "doc_status") in names for w in workspaces)

    async def teardown(self) -> None:
        await super().teardown()
        # LightRAG's drop() empties a collection; remove the per-test ones entirely.
        from pymongo import AsyncMongoClient

        client: Any = AsyncMongoClient(self.uri, serverSelectionTimeoutMS=5000)
        try:
            for workspace in self._storages:
                if workspace:
                    await client[self.database].drop_collection(f"{workspace}_doc_status")
        finally:
            await client.close()


def _lightrag_postgres_env(monkeypatch: pytest.MonkeyPatch, dsn: str) -> None:
    """Point LightRAG's PostgreSQL storages at the test server named by ``dsn``."""
    parts = urlsplit(dsn)
    monkeypatch.setenv("POSTGRES_HOST", parts.hostname or "127.0.0.1")
    monkeypatch.setenv("POSTGRES_PORT", str(parts.port or 5432))
    monkeypatch.setenv("POSTGRES_USER", unquote(parts.username or "postgres"))
    # LightRAG insists on a password even when the server trusts every local user.
    monkeypatch.setenv("POSTGRES_PASSWORD", unquote(parts.password or "unused"))
    monkeypatch.setenv("POSTGRES_DATABASE", parts.path.lstrip("/") or "postgres")
    monkeypatch.delenv("POSTGRES_WORKSPACE", raising=False)


def _lightrag_mongo_env(monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    monkeypatch.setenv("MONGO_URI", uri)
    monkeypatch.setenv("MONGO_DATABASE", os.environ.get("MONGO_DATABASE") or "tokmeter_test")
    monkeypatch.delenv("MONGODB_WORKSPACE", raising=False)


@pytest.fixture(params=BACKENDS)
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Backend]:
    """Each doc-status store in turn (servers from TOKMETER_TEST_*; skipped, or failed
    in CI, when one is not configured)."""
    kind = request.param
    made: Backend
    if kind == "json":
        made = JsonBackend(tmp_path / "rag")
    elif kind == "postgres":
        dsn = require_server("postgres")
        _lightrag_postgres_env(monkeypatch, dsn)
        made = PostgresBackend(dsn)
    else:
        uri = require_server("mongo")
        _lightrag_mongo_env(monkeypatch, uri)
        made = MongoBackend(uri)
    try:
        yield made
    finally:
        await made.teardown()


@pytest.fixture
def unique() -> str:
    """A suffix that makes names unique per test (servers keep data across runs)."""
    return uuid.uuid4().hex[:10]
