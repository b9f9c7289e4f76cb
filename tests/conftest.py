"""Shared fixtures: LightRAG instances on every doc-status store, scripted models."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import tokmeter

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: doc-status stores the integration suite runs on
STORE_KINDS = ("json", "postgres", "mongo")

_STORE_ENV = {
    "postgres": ("TOKMETER_TEST_POSTGRES_DSN", "PostgreSQL"),
    "mongo": ("TOKMETER_TEST_MONGO_URI", "MongoDB-compatible server"),
}


def require_server(kind: str) -> str:
    """The connection string of a test server, or skip (fail in CI) with how to start it."""
    env, label = _STORE_ENV[kind]
    value = os.environ.get(env)
    if value:
        return value
    message = (f"{label} not available: run `bash scripts/services.sh start` and "
               f"`source .services/env.sh` (sets {env}), or run the whole suite with "
               f"`bash scripts/test.sh`")
    if IN_CI:
        pytest.fail(f"CI must not skip backend tests: {message}")
    pytest.skip(message)


def lightrag_store_kwargs(kind: str) -> dict[str, Any]:
    """LightRAG constructor arguments selecting a doc-status store."""
    if kind == "json":
        return {}
    require_server(kind)
    if kind == "postgres":
        return {"doc_status_storage": "PGDocStatusStorage"}
    return {"doc_status_storage": "MongoDocStatusStorage"}


@pytest.fixture(autouse=True)
def _quiet_lightrag() -> None:
    logging.getLogger("lightrag").setLevel(logging.WARNING)


@pytest.fixture
def workspace() -> str:
    # LightRAG shares storage per workspace inside a process: one per test.
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["json"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """The doc-status store under test (parametrized over all stores where it matters)."""
    return str(request.param)


RagFactory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def make_rag(tmp_path: Path, workspace: str, store_kind: str) -> AsyncIterator[RagFactory]:
    """Build instrumented LightRAG instances; all are finalized after the test."""
    from lightrag import LightRAG
    from lightrag.utils import EmbeddingFunc

    from tests.scripted import EMBEDDING_DIM

    made: list[Any] = []

    async def make(llm: Any, embed: Any, *, instrument: bool = True,
                   workspace_name: str | None = None, **overrides: Any) -> Any:
        kwargs: dict[str, Any] = {
            "working_dir": str(tmp_path / "rag"),
            "workspace": workspace_name or workspace,
            "llm_model_func": llm,
            "embedding_func": EmbeddingFunc(embedding_dim=EMBEDDING_DIM, func=embed,
                                            max_token_size=8192),
            "max_parallel_insert": 4,
            "chunk_token_size": 120,
            "chunk_overlap_token_size": 10,
            **lightrag_store_kwargs(store_kind),
        }
        kwargs.update(overrides)
        rag = LightRAG(**kwargs)
        if instrument:
            tokmeter.instrument(rag)
        await rag.initialize_storages()
        made.append(rag)
        return rag

    yield make
    for rag in made:
        try:
            await rag.finalize_storages()
        except Exception:  # already finalized by the test
            pass


@pytest.fixture(autouse=True)
def _fresh_unattributed() -> None:
    tokmeter.reset_unattributed()
