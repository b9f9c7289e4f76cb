"""``tokmeter serve`` on PostgreSQL and MongoDB doc-status stores (LightRAG's own settings).

Needs the test servers of ``scripts/services.sh`` (skipped without them, failed in CI).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.api.harness import (
    FakeProvider,
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
from tests.conftest import require_server


def store_settings(kind: str) -> dict[str, str]:
    """LightRAG's environment selecting the doc-status store ``kind``."""
    location = require_server(kind)
    if kind == "postgres":
        parts = urlsplit(location)
        return {
            "LIGHTRAG_DOC_STATUS_STORAGE": "PGDocStatusStorage",
            "POSTGRES_HOST": parts.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(parts.port or 5432),
            "POSTGRES_USER": unquote(parts.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(parts.password or "unused"),
            "POSTGRES_DATABASE": parts.path.lstrip("/") or "postgres",
        }
    return {
        "LIGHTRAG_DOC_STATUS_STORAGE": "MongoDocStatusStorage",
        "MONGO_URI": location,
        "MONGO_DATABASE": "tokmeter_serve_test",
    }


@pytest.mark.backend
@pytest.mark.parametrize("kind", ["postgres", "mongo"])
def test_serve_meters_documents_on_the_configured_store(
        kind: str, base_env: dict[str, str], provider: FakeProvider,
        tmp_path: Path) -> None:
    settings = store_settings(kind)
    env = {k: v for k, v in base_env.items()
           if not k.startswith(("POSTGRES_", "MONGO_"))}
    env = server_env(env, provider, working_dir=tmp_path / "rag_storage",
                     workspace=f"serve_{uuid.uuid4().hex[:10]}", port=free_port(),
                     log_dir=tmp_path, **settings)
    server = start_server("tokmeter", env, tmp_path / "run")
    try:
        marker = new_marker()
        with server.client() as client:
            response = client.post("/documents/text", json={
                "text": document_text(marker, 5), "file_source": f"{marker}.txt"})
            response.raise_for_status()
            track_id = response.json()["track_id"]
            wait_for_track(client, track_id, 1)
            wait_pipeline_idle(client)

            def check() -> None:
                (doc,) = client.get(f"/documents/track_status/{track_id}").json()["documents"]
                assert doc["status"] == "processed"
                billed = provider.billed(marker_of(doc))
                del billed["failed_requests"]
                usage = doc["metadata"]["token_usage"]
                assert record_figures(usage) == billed
                body = client.get(f"/usage/documents/{doc['id']}").json()
                assert body["token_usage"] == usage
                (row,) = client.get("/usage/summary").json()["rows"]
                assert row["documents"] == 1 and row["total_tokens"] == usage["total_tokens"]

            eventually(check)
    finally:
        server.stop()
