"""Choosing, opening and closing the server-backed stores (beyond the shared contract)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tokmeter.backends import (
    JsonUsageStore,
    MongoUsageStore,
    PostgresUsageStore,
    open_store,
    store_for_rag,
)

from tests.backends.conftest import Backend, doc_status
from tests.conftest import require_server
from tokmeter._record import UsageRecord
from tokmeter.errors import (
    InvalidWorkspaceError,
    StoreError,
    StoreUnavailableError,
    UnknownWorkspaceError,
)


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- choosing a store -------------------------------------------------------------
@pytest.mark.parametrize("location, expected", [
    ("json:/srv/rag", JsonUsageStore),
    ("/srv/rag", JsonUsageStore),
    ("postgresql://u:p@db:5432/lightrag", PostgresUsageStore),
    ("postgres://db/lightrag", PostgresUsageStore),
    ("mongodb://db:27017", MongoUsageStore),
    ("mongodb+srv://cluster.example.com", MongoUsageStore),
])
def test_open_store_picks_the_backend_from_the_location(location: str, expected: type) -> None:
    store = open_store(location, workspace="acme")
    assert type(store) is expected
    assert store.workspace == "acme"


def test_open_store_rejects_an_unknown_scheme() -> None:
    with pytest.raises(StoreError, match="unsupported store location scheme 'redis'"):
        open_store("redis://localhost:6379")


def test_mongo_database_defaults_like_lightrag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MONGO_DATABASE", raising=False)
    assert MongoUsageStore("mongodb://db").database_name == "LightRAG"
    monkeypatch.setenv("MONGO_DATABASE", "rag_prod")
    assert MongoUsageStore("mongodb://db").database_name == "rag_prod"
    assert MongoUsageStore("mongodb://db", database="other").database_name == "other"


def test_store_for_rag_follows_the_doc_status_storage(tmp_path: Path) -> None:
    from lightrag.kg.mongo_impl import MongoDocStatusStorage
    from lightrag.kg.postgres_impl import PGDocStatusStorage

    pg = PGDocStatusStorage(namespace="doc_status", workspace="acme", global_config={},
                            embedding_func=None)
    mongo = MongoDocStatusStorage(namespace="doc_status", workspace="acme", global_config={},
                                  embedding_func=None)
    assert type(store_for_rag(SimpleNamespace(doc_status=pg))) is PostgresUsageStore
    mongo_store = store_for_rag(SimpleNamespace(doc_status=mongo))
    assert type(mongo_store) is MongoUsageStore
    assert isinstance(mongo_store, MongoUsageStore)
    assert mongo_store.collection_name == "acme_doc_status"

    class RedisDocStatusStorage:
        workspace = "acme"

    with pytest.raises(StoreError, match="no usage store for LightRAG's RedisDocStatusStorage"):
        store_for_rag(SimpleNamespace(doc_status=RedisDocStatusStorage()))


async def test_a_store_of_an_uninitialized_rag_says_what_to_do() -> None:
    from lightrag.kg.mongo_impl import MongoDocStatusStorage
    from lightrag.kg.postgres_impl import PGDocStatusStorage

    for storage in (
        PGDocStatusStorage(namespace="doc_status", workspace="acme", global_config={},
                           embedding_func=None),
        MongoDocStatusStorage(namespace="doc_status", workspace="acme", global_config={},
                              embedding_func=None),
    ):
        store = store_for_rag(SimpleNamespace(doc_status=storage))
        with pytest.raises(StoreUnavailableError, match="initialize_storages"):
            await store.get_usage("doc-1")


# -- workspace names MongoDB cannot take --------------------------------------------
@pytest.mark.parametrize("workspace, problem", [
    ("price$", "may not contain '\\$'"),
    ('{"$gt": ""}', "may not contain '\\$'"),
    ("system.users", "reserved"),
    ("x" * 200, "too long"),
])
def test_mongo_refuses_workspaces_that_cannot_name_a_collection(
    workspace: str, problem: str
) -> None:
    with pytest.raises(InvalidWorkspaceError, match=problem):
        MongoUsageStore("mongodb://db", workspace, database="d" * 60)


def test_every_store_refuses_path_like_workspaces() -> None:
    for location in ("json:/srv/rag", "postgresql://db/x", "mongodb://db"):
        for workspace in ("a/b", "..", "tab\there"):
            with pytest.raises(InvalidWorkspaceError):
                open_store(location, workspace=workspace)


# -- unreachable servers -------------------------------------------------------------
async def test_unreachable_postgres_raises_store_unavailable_without_the_password() -> None:
    store = PostgresUsageStore(
        f"postgresql://billing:s3cret@127.0.0.1:{closed_port()}/lightrag", "acme",
        connect_timeout=2,
    )
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="cannot connect to PostgreSQL") as info:
        async with store:
            pass
    assert time.monotonic() - started < 10
    assert "s3cret" not in str(info.value)
    assert "billing:***@127.0.0.1" in str(info.value)


async def test_unreachable_mongo_raises_store_unavailable() -> None:
    store = MongoUsageStore(f"mongodb://127.0.0.1:{closed_port()}", "acme", connect_timeout=1)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="cannot reach MongoDB"):
        async with store:
            pass
    assert time.monotonic() - started < 10


async def test_postgres_with_a_missing_database_is_unavailable() -> None:
    dsn = require_server("postgres")
    missing = dsn.rsplit("/", 1)[0] + "/no_such_database_tokmeter"
    with pytest.raises(StoreUnavailableError, match="no_such_database_tokmeter"):
        async with PostgresUsageStore(missing, "acme"):
            pass


# -- unknown workspaces only when asked ------------------------------------------------
@pytest.mark.parametrize("kind", ["postgres", "mongo"])
async def test_unknown_workspace_is_an_error_only_when_required(
    kind: str, workspace: str
) -> None:
    location = require_server(kind)
    options: dict[str, Any] = {"database": "tokmeter_test"} if kind == "mongo" else {}

    async with open_store(location, workspace=workspace, **options) as store:
        assert await store.workspace_exists() is False
        assert await store.get_usage("doc-1") is None
        assert await store.aggregate() == []

    with pytest.raises(UnknownWorkspaceError, match=repr(workspace)):
        async with open_store(location, workspace=workspace, require_workspace=True, **options):
            pass


# -- clients and pools the caller owns ---------------------------------------------------
async def _seeded(backend: Backend, workspace: str) -> UsageRecord:
    record = UsageRecord(llm_input_tokens=5, llm_output_tokens=1, llm_calls=1, run_id="r",
                         revision=1, processing_end_time=1_700_000_000)
    await backend.seed(workspace, {"doc-1": doc_status("t", record.to_dict())})
    return record


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_postgres_store_leaves_a_given_pool_open(backend: Any, workspace: str) -> None:
    import asyncpg

    record = await _seeded(backend, workspace)
    pool = await asyncpg.create_pool(backend.dsn, min_size=1, max_size=2)
    try:
        async with PostgresUsageStore(pool=pool, workspace=workspace) as store:
            got = await store.get_usage("doc-1")
            assert got is not None and got.usage == record
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


@pytest.mark.parametrize("backend", ["mongo"], indirect=True)
async def test_mongo_store_accepts_pymongo_and_motor_clients_and_leaves_them_open(
    backend: Any, workspace: str
) -> None:
    from motor.motor_asyncio import AsyncIOMotorClient
    from pymongo import AsyncMongoClient

    record = await _seeded(backend, workspace)
    for merged, make in enumerate((AsyncMongoClient, AsyncIOMotorClient)):
        client: Any = make(backend.uri, serverSelectionTimeoutMS=5000)
        try:
            async with MongoUsageStore(client, workspace, database=backend.database) as store:
                got = await store.get_usage("doc-1")
                assert got is not None and got.usage is not None
                assert got.usage.llm_calls == record.llm_calls + merged
                assert [d.doc_id for d in await store.usage_for_track("t")] == ["doc-1"]
                assert await store.merge_usage_delta("doc-1", {"llm_calls": 1})
                assert await store.write_usage("doc-1", record) is True  # older: kept
                assert await store.aggregate(group_by="model") == []
                assert [t.llm_calls for t in await store.aggregate()] == [
                    record.llm_calls + merged + 1
                ]
            assert (await client[backend.database].command("ping"))["ok"] == 1
        finally:
            closing = client.close()
            if closing is not None:
                await closing


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_postgres_default_workspace_is_stored_as_default(
    backend: Any, unique: str
) -> None:
    doc_id = f"default-doc-{unique}"
    await backend.seed("", {doc_id: doc_status("t", None)})
    # What LightRAG wrote for workspace "" is LightRAG's "default" workspace.
    for workspace in ("", "default"):
        async with PostgresUsageStore(backend.dsn, workspace) as store:
            assert store.table_workspace == "default"
            got = await store.get_usage(doc_id)
            assert got is not None and got.doc_id == doc_id
