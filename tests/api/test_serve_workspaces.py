"""Documents processed without tokmeter stay as they were; no workspace reads another's.

A stock ``lightrag-server`` ingests a document into workspace ``legacy``; then
``tokmeter serve`` takes over the same working_dir and workspace. The session's
``alpha`` server (``tokmeter serve``, workspace ``alpha``) shares the working_dir.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.harness import (
    FakeProvider,
    LightRAGServer,
    document_text,
    eventually,
    free_port,
    marker_of,
    new_marker,
    server_env,
    start_server,
    wait_for_track,
    wait_pipeline_idle,
)

TOKMETER_KEYS = {"token_usage", "processing_start_time", "processing_end_time"}


def ingest(server: LightRAGServer, marker: str) -> tuple[str, list[dict[str, Any]]]:
    with server.client() as client:
        response = client.post("/documents/text", json={
            "text": document_text(marker, 4), "file_source": f"{marker}.txt"})
        response.raise_for_status()
        track_id = str(response.json()["track_id"])
        documents = wait_for_track(client, track_id, 1)
        wait_pipeline_idle(client)
    return track_id, documents


@pytest.fixture(scope="module")
def legacy(base_env: dict[str, str], provider: FakeProvider, working_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    rundir = tmp_path_factory.mktemp("legacy")
    env = server_env(base_env, provider, working_dir=working_dir, workspace="legacy",
                     port=free_port(), log_dir=rundir)
    stock = start_server("stock", env, rundir / "stock")
    try:
        old_marker = new_marker()
        old_track, _ = ingest(stock, old_marker)
        with stock.client() as client:
            before = client.get(f"/documents/track_status/{old_track}").json()
    finally:
        stock.stop()
    server = start_server("tokmeter", env, rundir / "tokmeter")
    try:
        new_marker_ = new_marker()
        new_track, _ = ingest(server, new_marker_)
        yield {"server": server, "before": before, "old_track": old_track,
               "old_marker": old_marker, "new_track": new_track, "new_marker": new_marker_}
    finally:
        server.stop()


def test_documents_processed_without_tokmeter_look_exactly_as_before(
        legacy: dict[str, Any], provider: FakeProvider) -> None:
    server: LightRAGServer = legacy["server"]
    (old_before,) = legacy["before"]["documents"]
    assert old_before["status"] == "processed"
    assert not TOKMETER_KEYS & set(old_before["metadata"])

    with server.client() as client:
        after = client.get(f"/documents/track_status/{legacy['old_track']}").json()
        # The document is exactly what the stock server returned.
        assert after["documents"] == legacy["before"]["documents"]
        # LightRAG itself counts an in-memory status as "DocStatus.PROCESSED" and a
        # reloaded one as "processed" (a restart artifact, not tokmeter's).
        assert {k.replace("DocStatus.", "").lower(): v
                for k, v in legacy["before"]["status_summary"].items()} == after[
            "status_summary"]

        (new,) = client.get(f"/documents/track_status/{legacy['new_track']}").json()[
            "documents"]
        assert set(new["metadata"]) - TOKMETER_KEYS == set(old_before["metadata"])
        assert new["metadata"]["token_usage"]["total_tokens"] > 0

        old_usage = client.get(f"/usage/documents/{old_before['id']}").json()
        assert old_usage["status"] == "processed" and old_usage["token_usage"] is None
        track = client.get(f"/usage/tracks/{legacy['old_track']}").json()
        assert track["total"]["documents"] == 0  # nothing metered in that upload
        (row,) = client.get("/usage/summary").json()["rows"]
        assert row["documents"] == 1
        assert row["total_tokens"] == new["metadata"]["token_usage"]["total_tokens"]

    def billed_matches() -> None:
        with server.client() as client:
            (doc,) = client.get(f"/documents/track_status/{legacy['new_track']}").json()[
                "documents"]
        billed = provider.billed(marker_of(doc))
        usage = doc["metadata"]["token_usage"]
        assert usage["llm_input_tokens"] == billed["llm_input_tokens"]
        assert usage["embedding_tokens"] == billed["embedding_tokens"]

    eventually(billed_matches)


def test_no_request_reads_another_workspace(
        legacy: dict[str, Any], alpha: LightRAGServer, alpha_uploads: dict[str, Any]) -> None:
    server: LightRAGServer = legacy["server"]
    alpha_doc = alpha_uploads["documents"]["single"][0]
    with server.client() as client:
        (legacy_doc,) = client.get(f"/documents/track_status/{legacy['new_track']}").json()[
            "documents"]
        legacy_summary = client.get("/usage/summary").json()
    with alpha.client() as client:
        alpha_summary = client.get("/usage/summary").json()

    # Same working_dir, different workspaces: each server sees only its own documents,
    # by id, by track and in its totals, whatever header the request carries.
    for reader, doc, workspace in ((alpha, legacy_doc, "legacy"),
                                   (server, alpha_doc, "alpha")):
        with reader.client() as client:
            assert client.get(f"/usage/documents/{doc['id']}").status_code == 404
            assert client.get(f"/usage/tracks/{doc['track_id']}").json()["documents"] == []
            for path in (f"/usage/documents/{doc['id']}", f"/usage/tracks/{doc['track_id']}",
                         "/usage/summary"):
                response = client.get(path, headers={"LIGHTRAG-WORKSPACE": workspace})
                assert response.status_code == 400, path
    assert legacy_summary["workspace"] == "legacy" and alpha_summary["workspace"] == "alpha"
    assert legacy_summary["rows"][0]["documents"] == 1
    assert alpha_summary["rows"][0]["documents"] == 5
