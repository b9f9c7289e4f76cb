"""Usage in LightRAG's MongoDB doc-status collection (``{workspace}_doc_status``).

LightRAG gives each workspace its own collection (``doc_status`` for the default,
empty workspace), one document per LightRAG document with ``_id`` = doc id and no
workspace field. This store patches ``metadata.token_usage`` in place: every write
is one ``update_one`` that touches that key only, so it is atomic beside a running
LightRAG and never clobbers the other metadata keys. Aggregation runs on the server.

Works with pymongo's ``AsyncMongoClient`` (what LightRAG uses) and with motor's
``AsyncIOMotorClient``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import Iterator
from typing import Any

from pymongo.errors import ConfigurationError, ConnectionFailure, InvalidName, InvalidURI
from tokmeter.backends._base import (
    MODEL_DELTA_KEYS,
    DocumentUsage,
    UsageDelta,
    UsageStore,
    UsageTotals,
    document_from_row,
    model_totals,
    totals_from_row,
)

from tokmeter._record import UsageRecord
from tokmeter.errors import (
    InvalidWorkspaceError,
    StoreError,
    StoreUnavailableError,
    UnknownWorkspaceError,
)

#: LightRAG's namespace for doc status; the collection is ``{workspace}_doc_status``.
NAMESPACE = "doc_status"

#: Database LightRAG uses when ``MONGO_DATABASE`` is not set.
DEFAULT_DATABASE = "LightRAG"

#: Seconds to wait for the server before reporting it unreachable.
CONNECT_TIMEOUT = 5.0

# MongoDB limits a namespace ("<database>.<collection>") to 255 bytes.
_MAX_NAMESPACE_BYTES = 255

_TU = "metadata.token_usage"
_FIELDS = {"status": 1, "track_id": 1, "file_path": 1, "metadata": 1}


def collection_name(workspace: str) -> str:
    """LightRAG's doc-status collection name for ``workspace``."""
    return f"{workspace}_{NAMESPACE}" if workspace else NAMESPACE


def check_mongo_workspace(workspace: str, database: str | None = None) -> str:
    """Raise :class:`InvalidWorkspaceError` if ``workspace`` cannot name a MongoDB collection.

    Quotes, dots and SQL are fine; ``$`` and a ``system.`` prefix are not.
    """
    name = collection_name(workspace)
    if "$" in workspace:
        raise InvalidWorkspaceError(
            f"workspace {workspace!r} cannot be used with MongoDB: collection names may not "
            "contain '$'; pick a workspace name without it"
        )
    if name.startswith("system."):
        raise InvalidWorkspaceError(
            f"workspace {workspace!r} cannot be used with MongoDB: collection names starting "
            "with 'system.' are reserved"
        )
    if database is not None and len(f"{database}.{name}".encode()) > _MAX_NAMESPACE_BYTES:
        raise InvalidWorkspaceError(
            f"workspace {workspace!r} is too long for MongoDB: '{database}.{name}' exceeds "
            f"{_MAX_NAMESPACE_BYTES} bytes"
        )
    return workspace


async def _maybe_await(value: Any) -> Any:
    # motor returns some results directly where pymongo's async API returns awaitables.
    if inspect.isawaitable(value):
        return await value
    return value


def _number(path: str) -> dict[str, Any]:
    """A stored counter read the way :meth:`UsageRecord.from_dict` reads it: a number as
    is, null stays null (ignored by ``$sum``), missing or garbage is 0."""
    return {"$switch": {
        "branches": [
            {"case": {"$isNumber": path}, "then": path},
            {"case": {"$eq": [{"$type": path}, "null"]}, "then": None},
        ],
        "default": 0,
    }}


def _plus(path: str, amount: int) -> dict[str, Any]:
    """``path + amount`` where null (unknown) stays null and missing or garbage is 0;
    the same rule as ``_add_count`` in ``_base``."""
    return {"$switch": {
        "branches": [
            {"case": {"$eq": [{"$type": path}, "null"]}, "then": None},
            {"case": {"$isNumber": path}, "then": {"$add": [path, amount]}},
        ],
        "default": amount,
    }}


def _merge_pipeline(delta: UsageDelta) -> list[dict[str, Any]]:
    """An update pipeline adding ``delta`` to ``metadata.token_usage``.

    A pipeline rather than ``$inc``: ``$inc`` fails on a stored null (unknown) count,
    and model names such as ``gpt-4.1`` cannot be dotted paths. ``$getField`` /
    ``$setField`` with ``$literal`` names (MongoDB 5.0+) take any name literally.
    """
    stages: list[dict[str, Any]] = []
    if delta.counts:
        stages.append({"$set": {
            f"{_TU}.{key}": _plus(f"${_TU}.{key}", amount) for key, amount in delta.counts.items()
        }})
    if delta.models:
        models = f"${_TU}.models"
        # $ifNull first: a missing field must not reach $type (some servers report
        # "object" for it); then anything that is not an object starts empty.
        stages.append({"$set": {f"{_TU}.models": {"$let": {
            "vars": {"m": {"$ifNull": [models, {"$literal": {}}]}},
            "in": {"$cond": [{"$eq": [{"$type": "$$m"}, "object"]}, "$$m", {"$literal": {}}]},
        }}}})
        for name, model in delta.models.items():
            fresh = {"$literal": {"kind": model.kind or "llm",
                                  **dict.fromkeys(MODEL_DELTA_KEYS, 0)}}
            current = {"$getField": {"field": {"$literal": name}, "input": models}}
            entry = {"$let": {
                "vars": {"e": {"$ifNull": [current, fresh]}},
                "in": {"$cond": [{"$eq": [{"$type": "$$e"}, "object"]}, "$$e", fresh]},
            }}
            stages.append({"$set": {f"{_TU}.models": {"$let": {
                "vars": {"entry": entry},
                "in": {"$setField": {
                    "field": {"$literal": name},
                    "input": models,
                    "value": {"$mergeObjects": [
                        "$$entry",
                        {key: _plus(f"$$entry.{key}", n) for key, n in model.counts.items()},
                    ]},
                }},
            }}}})
    return stages


class MongoUsageStore(UsageStore):
    """Usage stored by LightRAG's ``MongoDocStatusStorage``.

    From a URI (the store opens and closes its own client)::

        async with MongoUsageStore("mongodb://db:27017", "acme", database="LightRAG") as s:
            docs = await s.usage_for_track("insert_20250101_...")

    or from a client you own (pymongo ``AsyncMongoClient`` or motor
    ``AsyncIOMotorClient``; never closed by the store), or from a running LightRAG
    instance with :meth:`from_rag` (reuses its collection). LightRAG's
    ``MONGODB_WORKSPACE`` override is honoured only through :meth:`from_rag`.

    Args:
        client: ``mongodb://`` URI or a client object.
        workspace: LightRAG workspace (``""`` is the collection ``doc_status``).
        database: Database name; default ``$MONGO_DATABASE`` or ``"LightRAG"``, as in LightRAG.
        connect_timeout: Seconds before an unreachable server raises
            :class:`~tokmeter.errors.StoreUnavailableError`.
        require_workspace: If true, :meth:`open` raises
            :class:`~tokmeter.errors.UnknownWorkspaceError` when the workspace's
            collection does not exist.
        storage: LightRAG's initialized ``MongoDocStatusStorage`` to share (what
            :meth:`from_rag` passes).

    Raises:
        InvalidWorkspaceError: The workspace cannot name a MongoDB collection
            (contains ``$``, starts with ``system.``, or is too long).
    """

    backend = "mongo"

    def __init__(
        self,
        client: Any = None,
        workspace: str = "",
        *,
        database: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        require_workspace: bool = False,
        storage: Any = None,
    ) -> None:
        super().__init__(workspace)
        if client is None and storage is None:
            raise StoreError("MongoUsageStore needs a mongodb:// URI or a client")
        self.database_name = database or os.environ.get("MONGO_DATABASE") or DEFAULT_DATABASE
        if storage is None:
            check_mongo_workspace(workspace, self.database_name)
        self.connect_timeout = connect_timeout
        self.require_workspace = require_workspace
        self._uri = client if isinstance(client, str) else None
        self._client: Any = None if isinstance(client, str) else client
        self._owns_client = False
        self._storage = storage
        self._opened = False
        self._open_lock = asyncio.Lock()

    @classmethod
    def from_rag(cls, rag: Any) -> MongoUsageStore:
        """The store of a LightRAG instance configured with ``MongoDocStatusStorage``."""
        storage = rag.doc_status
        return cls(None, storage.workspace or "", storage=storage)

    @property
    def collection_name(self) -> str:
        """The collection this store reads and writes."""
        if self._storage is not None:
            return str(getattr(self._storage, "_collection_name", collection_name(self.workspace)))
        return collection_name(self.workspace)

    def _where(self) -> str:
        if self._storage is not None:
            return "LightRAG's MongoDB"
        return f"MongoDB {self._uri}" if self._uri else "MongoDB (given client)"

    async def open(self) -> None:
        """Connect (standalone stores only) and check the server answers; idempotent."""
        await self._ensure_connected()
        if self.require_workspace and not await self._workspace_exists():
            raise UnknownWorkspaceError(
                f"no LightRAG doc-status collection {self.collection_name!r} for workspace "
                f"{self.workspace!r} in database {self.database_name!r} at {self._where()}; "
                "check the workspace and database names"
            )

    async def _ensure_connected(self) -> None:
        if self._storage is None and not self._opened:
            async with self._open_lock:
                if not self._opened:
                    await self._connect()
                    self._opened = True

    async def _connect(self) -> None:
        if self._client is None:
            from pymongo import AsyncMongoClient

            timeout_ms = int(self.connect_timeout * 1000)
            try:
                self._client = AsyncMongoClient(
                    self._uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms
                )
            except (InvalidURI, ConfigurationError, ValueError) as exc:
                raise StoreError(f"invalid MongoDB URI {self._uri!r}: {exc}") from exc
            self._owns_client = True
        try:
            await self._client[self.database_name].command("ping")
        except ConnectionFailure as exc:
            await self.close()
            raise StoreUnavailableError(
                f"cannot reach {self._where()}: {type(exc).__name__}: {exc}. Check that the "
                "server is running and the URI is right."
            ) from exc
        except InvalidName as exc:
            await self.close()
            raise StoreError(
                f"invalid MongoDB database name {self.database_name!r}: {exc}"
            ) from exc

    async def close(self) -> None:
        """Close the client if this store created it."""
        if self._owns_client and self._client is not None:
            client, self._client, self._owns_client = self._client, None, False
            await _maybe_await(client.close())
        self._opened = False

    async def _collection(self) -> Any:
        if self._storage is not None:
            collection = getattr(self._storage, "_data", None)
            if collection is None:
                raise StoreUnavailableError(
                    "LightRAG's MongoDocStatusStorage is not initialized (or already finalized): "
                    "await rag.initialize_storages() before using its usage store"
                )
            return collection
        await self._ensure_connected()
        return self._client[self.database_name][self.collection_name]

    @contextlib.contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except ConnectionFailure as exc:
            raise StoreUnavailableError(
                f"{self._where()} is unreachable: {type(exc).__name__}: {exc}"
            ) from exc

    def _document(self, doc: dict[str, Any]) -> DocumentUsage:
        return document_from_row(str(doc["_id"]), self.workspace, doc, doc.get("metadata"))

    async def _get(self, doc_id: str) -> DocumentUsage | None:
        collection = await self._collection()
        with self._translate_errors():
            # A str in a filter is matched literally, even '{"$gt": ""}'.
            doc = await collection.find_one({"_id": doc_id}, _FIELDS)
        return self._document(doc) if doc is not None else None

    async def _list_track(self, track_id: str) -> list[DocumentUsage]:
        collection = await self._collection()
        with self._translate_errors():
            docs = await collection.find({"track_id": track_id}, _FIELDS).to_list(None)
        return [self._document(doc) for doc in docs]

    async def _write(self, doc_id: str, record: UsageRecord) -> bool:
        collection = await self._collection()
        with self._translate_errors():
            result = await collection.update_one(
                {
                    "_id": doc_id,
                    f"{_TU}.run_id": record.run_id,
                    # $not/$gte also matches a missing revision (counts as 0).
                    f"{_TU}.revision": {"$not": {"$gte": record.revision}},
                },
                {"$set": {_TU: record.to_dict()}},
            )
            if result.matched_count:
                return True
            # Not written: harmless if the same run already stored this or a later revision.
            stored = await collection.find_one(
                {"_id": doc_id}, {f"{_TU}.run_id": 1, f"{_TU}.revision": 1}
            )
        usage = ((stored or {}).get("metadata") or {}).get("token_usage") or {}
        if not isinstance(usage, dict) or usage.get("run_id") != record.run_id:
            return False
        revision = usage.get("revision")
        return isinstance(revision, (int, float)) and revision >= record.revision

    async def _merge_delta(self, doc_id: str, delta: UsageDelta, run_id: str | None) -> bool:
        collection = await self._collection()
        query: dict[str, Any] = {"_id": doc_id, _TU: {"$type": "object"}}
        if run_id is not None:
            query[f"{_TU}.run_id"] = run_id
        pipeline = _merge_pipeline(delta)
        with self._translate_errors():
            if not pipeline:  # nothing to add: report whether it would have applied
                return await collection.find_one(query, {"_id": 1}) is not None
            result = await collection.update_one(query, pipeline)
        return bool(result.matched_count)

    async def _aggregate(
        self, since: int | None, until: int | None, group_by: str | None, track_id: str | None
    ) -> list[UsageTotals]:
        match: dict[str, Any] = {_TU: {"$type": "object"}}
        if track_id is not None:
            match["track_id"] = track_id
        ended: dict[str, int] = {}
        if since is not None:
            ended["$gte"] = since
        if until is not None:
            ended["$lt"] = until
        if ended:
            match[f"{_TU}.processing_end_time"] = ended
        if group_by == "model":
            match[f"{_TU}.models"] = {"$type": "object"}
            pipeline: list[dict[str, Any]] = [
                {"$match": match},
                {"$project": {"m": {"$objectToArray": f"${_TU}.models"}}},
                {"$unwind": "$m"},
                {"$group": {
                    "_id": "$m.k",
                    "documents": {"$sum": 1},
                    "embedding": {"$max": {"$cond": [{"$eq": ["$m.v.kind", "embedding"]}, 1, 0]}},
                    "input_tokens": {"$sum": _number("$m.v.input_tokens")},
                    "output_tokens": {"$sum": _number("$m.v.output_tokens")},
                    "calls": {"$sum": _number("$m.v.calls")},
                }},
            ]
            rows = await self._run_pipeline(pipeline)
            totals = [_model_totals(row) for row in rows]
        else:
            pipeline = [
                {"$match": match},
                {"$project": {"_id": 0, "track_id": 1, "tu": f"${_TU}"}},
                {"$group": {"_id": _group_key(group_by), **_TOTALS}},
            ]
            rows = await self._run_pipeline(pipeline)
            totals = [totals_from_row(row["_id"], row) for row in rows]
        return totals

    async def _run_pipeline(self, pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
        collection = await self._collection()
        with self._translate_errors():
            cursor = await _maybe_await(collection.aggregate(pipeline))
            return list(await cursor.to_list(None))

    async def _workspace_exists(self) -> bool:
        if self._storage is not None:
            return getattr(self._storage, "_data", None) is not None
        await self._ensure_connected()
        database = self._client[self.database_name]
        with self._translate_errors():
            names = await database.list_collection_names(filter={"name": self.collection_name})
        return self.collection_name in names


def _group_key(group_by: str | None) -> Any:
    if group_by == "track_id":
        return "$track_id"
    if group_by == "day":
        ended = "$tu.processing_end_time"
        return {"$cond": [
            {"$isNumber": ended},
            {"$dateToString": {
                "format": "%Y-%m-%d",
                "date": {"$toDate": {"$multiply": [{"$toLong": {"$trunc": [ended, 0]}}, 1000]}},
                "timezone": "UTC",
            }},
            None,
        ]}
    return None


_TOTALS: dict[str, Any] = {
    "documents": {"$sum": 1},
    "llm_input_tokens": {"$sum": _number("$tu.llm_input_tokens")},
    "llm_output_tokens": {"$sum": _number("$tu.llm_output_tokens")},
    "embedding_tokens": {"$sum": _number("$tu.embedding_tokens")},
    # $add is null if any part is unknown, and $sum skips nulls: as total_tokens does.
    "total_tokens": {"$sum": {"$add": [
        _number("$tu.llm_input_tokens"),
        _number("$tu.llm_output_tokens"),
        _number("$tu.embedding_tokens"),
    ]}},
    "llm_calls": {"$sum": _number("$tu.llm_calls")},
    "embedding_calls": {"$sum": _number("$tu.embedding_calls")},
    "llm_cache_hits": {"$sum": _number("$tu.llm_cache_hits")},
    "estimated_documents": {"$sum": {"$cond": [{"$eq": ["$tu.estimated", True]}, 1, 0]}},
    # complete defaults to true when missing; null, false, 0 and "" mean incomplete.
    "incomplete_documents": {"$sum": {"$cond": [
        {"$and": [
            {"$ne": [{"$type": "$tu.complete"}, "missing"]},
            {"$in": ["$tu.complete", [False, None, 0, ""]]},
        ]},
        1,
        0,
    ]}},
}


def _model_totals(row: dict[str, Any]) -> UsageTotals:
    return model_totals(
        row["_id"], documents=int(row["documents"]), embedding=bool(row.get("embedding")),
        input_tokens=int(row.get("input_tokens") or 0),
        output_tokens=int(row.get("output_tokens") or 0), calls=int(row.get("calls") or 0))
