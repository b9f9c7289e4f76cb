"""``tokmeter serve --gunicorn --workers 2``: LightRAG's gunicorn launcher, metered."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.harness import (
    FakeProvider,
    LightRAGServer,
    document_text,
    eventually,
    free_port,
    marker_of,
    new_marker,
    record_figures,
    server_env,
    start_server,
    wait_for_track,
    wait_pipeline_idle,
)

KEY = "multi-worker-key"


@pytest.fixture(scope="module")
def multi(base_env: dict[str, str], provider: FakeProvider, working_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[LightRAGServer]:
    rundir = tmp_path_factory.mktemp("multi")
    env = server_env(base_env, provider, working_dir=working_dir, workspace="multi",
                     port=free_port(), log_dir=rundir, LIGHTRAG_API_KEY=KEY)
    server = start_server("tokmeter-gunicorn", env, rundir, headers={"X-API-Key": KEY},
                          extra_args=["--workers", "2"])
    try:
        yield server
    finally:
        server.stop()


def fresh(server: LightRAGServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request on a new connection (so gunicorn may hand it to either worker)."""
    headers = {**server.headers, "Connection": "close"}
    return httpx.request(method, server.url + path, headers=headers, timeout=60, **kwargs)


def test_two_workers_meter_every_document(multi: LightRAGServer,
                                          provider: FakeProvider) -> None:
    booted = {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)",
                                             multi.process.tail(10**6))}
    assert len(booted) == 2
    assert booted <= set(multi.process.children())  # both alive, children of the master

    markers = [new_marker() for _ in range(3)]
    tracks = []
    for i, marker in enumerate(markers):
        response = fresh(multi, "POST", "/documents/text", json={
            "text": document_text(marker, 3 + i), "file_source": f"{marker}.txt"})
        response.raise_for_status()
        tracks.append(response.json()["track_id"])
    with multi.client() as client:
        for track_id in tracks:
            wait_for_track(client, track_id, 1)
        wait_pipeline_idle(client)

    def check() -> list[dict[str, Any]]:
        documents = []
        for track_id in tracks:
            (doc,) = fresh(multi, "GET", f"/documents/track_status/{track_id}").json()[
                "documents"]
            assert doc["status"] == "processed"
            billed = provider.billed(marker_of(doc))
            del billed["failed_requests"]
            assert record_figures(doc["metadata"]["token_usage"]) == billed
            documents.append(doc)
        return documents

    documents = eventually(check)
    expected = sum(d["metadata"]["token_usage"]["total_tokens"] for d in documents)
    # Every worker answers the usage endpoints from the same store.
    for i in range(6):
        (row,) = fresh(multi, "GET", "/usage/summary").json()["rows"]
        assert row["documents"] == 3 and row["total_tokens"] == expected
        doc = documents[i % 3]
        body = fresh(multi, "GET", f"/usage/documents/{doc['id']}").json()
        assert body["token_usage"] == doc["metadata"]["token_usage"]
