"""HTTP endpoints for token usage: a FastAPI router to mount beside LightRAG's routes.

``tokmeter serve`` mounts it on LightRAG's server. Mount it on your own FastAPI app
with a :class:`~tokmeter.backends.UsageStore`::

    from tokmeter.api import usage_router
    app.include_router(usage_router(lambda: store_for_rag(rag), api_key="secret"))

Endpoints (relative to ``prefix``, default ``/usage``):

* ``GET /documents/{doc_id}``: one document's doc-status facts and ``token_usage``.
* ``GET /tracks/{track_id}``: every document of one upload, and their total.
* ``GET /summary``: totals of the workspace, optionally since / until a time, for one
  track, grouped by model, UTC day or track id.

The router serves exactly one workspace, the store's. A request whose
``LIGHTRAG-WORKSPACE`` header names another workspace is refused (400).
"""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

try:
    from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "tokmeter.api needs FastAPI; install the server extra: pip install 'tokmeter[server]'"
    ) from exc

from tokmeter.backends._base import UsageStore, UsageTotals, sum_usage
from tokmeter.errors import StoreError, StoreUnavailableError, UnknownWorkspaceError

if TYPE_CHECKING:
    import argparse

__all__ = [
    "WORKSPACE_HEADER",
    "DocumentUsageOut",
    "StoreSource",
    "TokenUsageOut",
    "TrackUsageOut",
    "UsageSummaryOut",
    "UsageTotalsOut",
    "configure_lightrag_api",
    "usage_router",
]

logger = logging.getLogger("tokmeter")

#: The request header LightRAG's server reads a workspace name from.
WORKSPACE_HEADER = "LIGHTRAG-WORKSPACE"

#: A store, or a function (plain or async) returning one; called at the first request.
StoreSource: TypeAlias = UsageStore | Callable[[], UsageStore | Awaitable[UsageStore]]


def configure_lightrag_api(args: Sequence[str] = ()) -> argparse.Namespace:
    """Initialize LightRAG's API settings from the environment (and ``args``) only.

    ``lightrag.api`` parses the program's command line the first time its settings are
    read, which happens when a module such as ``lightrag.api.routers.document_routes``
    is imported. Inside your own app (``uvicorn myapp:app``, pytest, ...) that command
    line is not LightRAG's and parsing fails. Call this first: it reads LightRAG's
    settings (``LIGHTRAG_API_KEY``, ``AUTH_ACCOUNTS``, ``TOKEN_SECRET``,
    ``WHITELIST_PATHS``, ... and ``.env``) as ``lightrag-server`` would, with ``args``
    in place of the command line. Returns the settings.

    LightRAG's authentication reads them when ``lightrag.api.utils_api`` is first
    imported, so call this before importing any ``lightrag.api`` module.
    """
    from lightrag.api import config

    saved = sys.argv
    sys.argv = [saved[0] if saved else "lightrag", *args]
    try:
        parsed = config.parse_args()
    finally:
        sys.argv = saved
    return config.initialize_config(parsed, force=True)  # type: ignore[no-any-return]


def _ensure_lightrag_api_configured() -> None:
    from lightrag.api import config

    if not getattr(config, "_initialized", True):
        configure_lightrag_api()


# -- response schemas (OpenAPI) ---------------------------------------------------------
class ModelUsageOut(BaseModel):
    """Usage of one model inside a record."""

    kind: Literal["llm", "embedding"]
    input_tokens: int | None
    output_tokens: int | None
    tokens: int | None
    calls: int


class TokenUsageOut(BaseModel):
    """The ``token_usage`` record stored in the document's doc-status metadata."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_: int = Field(alias="schema", description="record version")
    llm_input_tokens: int | None
    llm_output_tokens: int | None
    llm_calls: int
    llm_cache_hits: int
    embedding_tokens: int | None
    embedding_calls: int
    total_tokens: int | None
    total_chunks: int
    llm_model: str | None
    embedding_model: str | None
    models: dict[str, ModelUsageOut]
    estimated: bool
    complete: bool
    processing_start_time: int | None
    processing_end_time: int | None


class DocumentUsageOut(BaseModel):
    """One document's doc-status facts and token usage."""

    doc_id: str
    workspace: str
    status: str
    track_id: str | None
    file_path: str | None
    token_usage: TokenUsageOut | None = Field(
        description="null when the document was not metered (processed without tokmeter, "
                    "or not finished yet)")


class UsageTotalsOut(BaseModel):
    """Summed usage of a group of documents."""

    key: str | None = Field(description="the group: model name, UTC day (YYYY-MM-DD) or "
                                        "track id; null for an ungrouped total")
    documents: int
    llm_input_tokens: int
    llm_output_tokens: int
    embedding_tokens: int
    total_tokens: int
    llm_calls: int
    embedding_calls: int
    llm_cache_hits: int
    estimated_documents: int
    incomplete_documents: int


class TrackUsageOut(BaseModel):
    """Every document of one upload and their total."""

    track_id: str
    workspace: str
    documents: list[DocumentUsageOut]
    total: UsageTotalsOut = Field(description="sum over the metered documents")


class UsageSummaryOut(BaseModel):
    """Totals of a workspace."""

    workspace: str
    since: int | None = Field(description="Unix seconds, inclusive")
    until: int | None = Field(description="Unix seconds, exclusive")
    group_by: str | None
    track_id: str | None
    rows: list[UsageTotalsOut]


_DIGITS = re.compile(r"^-?\d+(\.\d+)?$")


def parse_time(value: str | None, name: str) -> int | None:
    """Unix seconds from Unix seconds or an ISO 8601 date / datetime (naive = UTC)."""
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    if _DIGITS.match(text):
        return int(float(text))
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        if len(text) == 10:
            parsed = dt.datetime.combine(dt.date.fromisoformat(text), dt.time())
        else:
            parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{name}={value!r} is neither Unix seconds nor an ISO 8601 date or datetime "
            "(e.g. 2025-01-31 or 2025-01-31T12:00:00Z)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return int(parsed.timestamp())


def _sanitized_workspace(value: str) -> str:
    # The same rule LightRAG's server applies to the header.
    return re.sub(r"[^a-zA-Z0-9_]", "_", value)


class _StoreHandle:
    """Resolves the router's store once, on first use."""

    def __init__(self, source: StoreSource) -> None:
        self._source = source
        self._store: UsageStore | None = source if isinstance(source, UsageStore) else None
        self._opened = False

    async def get(self) -> UsageStore:
        if self._store is None:
            made: Any = self._source()
            if inspect.isawaitable(made):
                made = await made
            if not isinstance(made, UsageStore):
                raise StoreError(f"the usage store factory returned {type(made).__name__}, "
                                 "not a tokmeter UsageStore")
            self._store = made
        if not self._opened:  # retried at the next request while it fails
            await self._store.open()
            self._opened = True
        return self._store


def usage_router(
    store_or_factory: StoreSource,
    *,
    api_key: str | None = None,
    dependencies: Sequence[Any] | None = None,
    prefix: str = "/usage",
    workspace: str | None = None,
    tags: Sequence[str] = ("usage",),
) -> APIRouter:
    """Build the FastAPI router of the usage endpoints for one store's workspace.

    Args:
        store_or_factory: A :class:`~tokmeter.backends.UsageStore`, or a function (plain
            or async) returning one, called at the first request. The router never
            closes it.
        api_key: LightRAG's API key (``LIGHTRAG_API_KEY``). The endpoints use LightRAG's
            own authentication dependency: the ``X-API-Key`` header, or a bearer token
            from LightRAG's ``/login`` when ``AUTH_ACCOUNTS`` is set, exactly like
            LightRAG's routes (including ``WHITELIST_PATHS``).
        dependencies: Use these FastAPI dependencies *instead of* LightRAG's
            authentication (for example your own auth; ``[]`` for none). Do not combine
            with ``api_key``.
        prefix: Path prefix of the endpoints.
        workspace: The workspace name clients may send in the ``LIGHTRAG-WORKSPACE``
            header (default: the store's). Any other name is refused.
        tags: OpenAPI tags.

    Returns:
        A ``fastapi.APIRouter``; mount it with ``app.include_router(...)``.

    Raises:
        ValueError: both ``api_key`` and ``dependencies`` were given.
    """
    if dependencies is not None and api_key is not None:
        raise ValueError("usage_router(): pass api_key (LightRAG's authentication) or "
                         "dependencies (your own), not both")
    if dependencies is None:
        _ensure_lightrag_api_configured()
        from lightrag.api.utils_api import get_combined_auth_dependency

        route_dependencies: list[Any] = [Depends(get_combined_auth_dependency(api_key))]
    else:
        route_dependencies = list(dependencies)

    handle = _StoreHandle(store_or_factory)
    router = APIRouter(prefix=prefix, tags=list(tags), dependencies=route_dependencies)

    async def store_for(request: Request) -> UsageStore:
        try:
            store = await handle.get()
        except UnknownWorkspaceError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        except StoreError as exc:
            logger.error("tokmeter: usage store unavailable: %s", exc)
            raise HTTPException(status_code=503,
                                detail=f"usage store unavailable: {exc}") from None
        named = request.headers.get(WORKSPACE_HEADER, "").strip()
        if named:
            served = {store.workspace, workspace if workspace is not None else store.workspace}
            if named not in served and _sanitized_workspace(named) not in served:
                raise HTTPException(
                    status_code=400,
                    detail=(f"this server serves the usage of workspace "
                            f"{next(iter(sorted(served)))!r} only; the {WORKSPACE_HEADER} "
                            f"header names {named!r}. Ask the server of that workspace."),
                )
        return store

    async def run(call: Awaitable[Any]) -> Any:
        try:
            return await call
        except UnknownWorkspaceError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        except StoreUnavailableError as exc:
            raise HTTPException(status_code=503,
                                detail=f"usage store unavailable: {exc}") from None
        except StoreError as exc:  # arguments are validated before: a store fault
            logger.error("tokmeter: usage store error: %s", exc)
            raise HTTPException(status_code=500, detail=f"usage store error: {exc}") from None

    @router.get("/documents/{doc_id}", response_model=DocumentUsageOut,
                summary="Token usage of one document")
    async def document_usage(
        request: Request,
        doc_id: str = Path(description="the document id (as in track_status)"),
    ) -> Any:
        """One document's status and ``token_usage`` (null if it was not metered)."""
        store = await store_for(request)
        found = await run(store.get_usage(doc_id))
        if found is None:
            raise HTTPException(status_code=404,
                                detail=f"no document {doc_id!r} in this workspace")
        return found.to_dict()

    @router.get("/tracks/{track_id}", response_model=TrackUsageOut,
                summary="Token usage of one upload (track id)")
    async def track_usage(
        request: Request,
        track_id: str = Path(description="the track id an upload endpoint returned"),
    ) -> Any:
        """Every document of one upload with its ``token_usage``, and their total."""
        store = await store_for(request)
        documents = await run(store.usage_for_track(track_id))
        metered = [(None, d.usage) for d in documents if d.usage is not None]
        totals = sum_usage(metered)
        total = totals[0].to_dict() if totals else {**_zero_totals(), "key": None}
        return {
            "track_id": track_id,
            "workspace": store.workspace,
            "documents": [d.to_dict() for d in documents],
            "total": total,
        }

    @router.get("/summary", response_model=UsageSummaryOut,
                summary="Token usage totals of the workspace")
    async def usage_summary(
        request: Request,
        since: str | None = Query(
            None, description="only documents whose processing ended at or after this "
                              "time: Unix seconds or ISO 8601 (naive = UTC)"),
        until: str | None = Query(
            None, description="only documents whose processing ended before this time"),
        group_by: Literal["model", "day", "track_id"] | None = Query(
            None, description="one row per model, per UTC day or per track id; "
                              "omit for one total row"),
        track_id: str | None = Query(None, description="only documents of this upload"),
    ) -> Any:
        """Totals of the workspace's metered documents."""
        try:
            since_s = parse_time(since, "since")
            until_s = parse_time(until, "until")
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        store = await store_for(request)
        rows = await run(store.aggregate(since=since_s, until=until_s, group_by=group_by,
                                         track_id=track_id or None))
        return {
            "workspace": store.workspace,
            "since": since_s,
            "until": until_s,
            "group_by": group_by,
            "track_id": track_id or None,
            "rows": [row.to_dict() for row in rows],
        }

    return router


def _zero_totals() -> dict[str, Any]:
    return dict(UsageTotals(key=None).to_dict())
