"""Fixtures of the end-to-end API tests: a fake OpenAI-compatible provider and LightRAG
servers started with ``tokmeter serve`` (or stock), all on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tokmeter
from tests.api.harness import (
    FakeProvider,
    LightRAGServer,
    document_text,
    free_port,
    new_marker,
    server_env,
    start_provider,
    start_server,
    wait_for_track,
    wait_pipeline_idle,
)

ALPHA_KEY = "alpha-secret-key"
ALPHA_ACCOUNT = ("auditor", "auditor-pass")


@pytest.fixture(scope="session")
def base_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of every child process: tiktoken works offline."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    tokmeter.install_tiktoken_rank_files(cache)
    env = dict(os.environ)
    env["TIKTOKEN_CACHE_DIR"] = str(cache)
    return env


@pytest.fixture(scope="session")
def provider(base_env: dict[str, str],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeProvider]:
    fake = start_provider(tmp_path_factory.mktemp("provider"), base_env)
    try:
        yield fake
    finally:
        fake.process.stop()


@pytest.fixture(scope="session")
def working_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One LightRAG working_dir shared by every server, each on its own workspace."""
    return tmp_path_factory.mktemp("lightrag") / "rag_storage"


@pytest.fixture(scope="session")
def alpha(base_env: dict[str, str], provider: FakeProvider, working_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[LightRAGServer]:
    """``tokmeter serve`` on workspace ``alpha`` with an API key and a login account."""
    rundir = tmp_path_factory.mktemp("alpha")
    env = server_env(base_env, provider, working_dir=working_dir, workspace="alpha",
                     port=free_port(), log_dir=rundir,
                     LIGHTRAG_API_KEY=ALPHA_KEY,
                     AUTH_ACCOUNTS=f"{ALPHA_ACCOUNT[0]}:{ALPHA_ACCOUNT[1]}",
                     TOKEN_SECRET="tokmeter-test-token-secret-0123456789")
    server = start_server("tokmeter", env, rundir, headers={"X-API-Key": ALPHA_KEY})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def alpha_uploads(alpha: LightRAGServer, provider: FakeProvider) -> dict[str, Any]:
    """Documents ingested on ``alpha`` through /documents/texts, /text and /upload,
    plus one the provider fails; waits until all are processed or failed."""
    markers = {name: new_marker() for name in ("batch_a", "batch_b", "single", "file")}
    markers["failing"] = new_marker("f")
    tracks: dict[str, str] = {}
    with alpha.client() as client:
        # First, so the binding's retries of the failing call overlap the other work.
        response = client.post("/documents/text", json={
            "text": document_text(markers["failing"], 4),
            "file_source": f"{markers['failing']}.txt"})
        response.raise_for_status()
        tracks["failing"] = response.json()["track_id"]

        response = client.post("/documents/texts", json={
            "texts": [document_text(markers["batch_a"], 3), document_text(markers["batch_b"], 8)],
            "file_sources": [f"{markers['batch_a']}.txt", f"{markers['batch_b']}.txt"]})
        response.raise_for_status()
        tracks["batch"] = response.json()["track_id"]

        response = client.post("/documents/text", json={
            "text": document_text(markers["single"], 6),
            "file_source": f"{markers['single']}.txt"})
        response.raise_for_status()
        tracks["single"] = response.json()["track_id"]

        content = document_text(markers["file"], 5).encode()
        response = client.post("/documents/upload",
                               files={"file": (f"{markers['file']}.md", content, "text/markdown")})
        response.raise_for_status()
        tracks["file"] = response.json()["track_id"]

        documents = {
            "batch": wait_for_track(client, tracks["batch"], 2),
            "single": wait_for_track(client, tracks["single"], 1),
            "file": wait_for_track(client, tracks["file"], 1),
            "failing": wait_for_track(client, tracks["failing"], 1),
        }
        wait_pipeline_idle(client)
    return {"markers": markers, "tracks": tracks, "documents": documents}
