"""``tokmeter serve`` end to end over HTTP: uploads, track_status, the usage endpoints.

The server is the stock LightRAG server (openai bindings, JSON stores) started with
``tokmeter serve`` on 127.0.0.1; the models are a fake OpenAI-compatible server that
reports real ``usage`` and logs what it billed per document marker.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import httpx

from tests.api.conftest import ALPHA_ACCOUNT, ALPHA_KEY
from tests.api.harness import (
    FakeProvider,
    LightRAGServer,
    eventually,
    marker_of,
    new_marker,
    record_figures,
)

USAGE_PATHS = ("/usage/documents/{doc_id}", "/usage/tracks/{track_id}", "/usage/summary")


def all_documents(uploads: dict[str, Any]) -> list[dict[str, Any]]:
    return [doc for docs in uploads["documents"].values() for doc in docs]


def track_documents(server: LightRAGServer, track_id: str) -> list[dict[str, Any]]:
    with server.client() as client:
        response = client.get(f"/documents/track_status/{track_id}")
        response.raise_for_status()
        return list(response.json()["documents"])


def test_each_document_carries_exactly_what_the_provider_billed(
        alpha: LightRAGServer, alpha_uploads: dict[str, Any], provider: FakeProvider) -> None:
    ok_tracks = ("batch", "single", "file")

    def check() -> None:
        seen = set()
        for name in ok_tracks:
            for doc in track_documents(alpha, alpha_uploads["tracks"][name]):
                assert doc["status"] == "processed", doc
                usage = doc["metadata"]["token_usage"]
                billed = provider.billed(marker_of(doc))
                assert billed["failed_requests"] == 0
                assert billed["llm_calls"] >= 1 and billed["embedding_tokens"] > 0
                del billed["failed_requests"]
                assert record_figures(usage) == billed, marker_of(doc)
                assert usage["total_tokens"] == (usage["llm_input_tokens"]
                                                 + usage["llm_output_tokens"]
                                                 + usage["embedding_tokens"])
                assert usage["complete"] is True and usage["estimated"] is False
                assert usage["llm_model"] == "fake-chat"
                assert usage["embedding_model"] == "fake-embed"
                seen.add(marker_of(doc))
        markers = alpha_uploads["markers"]
        assert seen == {markers["batch_a"], markers["batch_b"], markers["single"],
                        markers["file"]}

    eventually(check)
    # Documents of different sizes are billed differently (no averaging across a batch).
    batch = track_documents(alpha, alpha_uploads["tracks"]["batch"])
    totals = {d["metadata"]["token_usage"]["total_tokens"] for d in batch}
    assert len(totals) == 2


def test_failed_document_shows_partial_usage(
        alpha: LightRAGServer, alpha_uploads: dict[str, Any], provider: FakeProvider) -> None:
    marker = alpha_uploads["markers"]["failing"]

    def check() -> None:
        (doc,) = track_documents(alpha, alpha_uploads["tracks"]["failing"])
        assert doc["status"] == "failed"
        usage = doc["metadata"]["token_usage"]
        billed = provider.billed(marker)
        # The provider answered the first extraction call and failed the gleaning call
        # (LightRAG's openai binding retried it: 3 failed requests, one metered attempt).
        assert billed["llm_calls"] == 1 and billed["failed_requests"] == 3
        assert usage["complete"] is False
        assert usage["estimated"] is True  # the failed attempt's input is an estimate
        assert usage["llm_calls"] == billed["llm_calls"] + 1
        assert usage["llm_output_tokens"] == billed["llm_output_tokens"]
        assert usage["llm_input_tokens"] > billed["llm_input_tokens"]
        assert usage["embedding_tokens"] == billed["embedding_tokens"]
        assert any(f.startswith("document failed") for f in usage["faults"])

    eventually(check)


def test_usage_endpoints_agree_with_track_status(
        alpha: LightRAGServer, alpha_uploads: dict[str, Any]) -> None:
    documents = {d["id"]: d for name in alpha_uploads["tracks"]
                 for d in track_documents(alpha, alpha_uploads["tracks"][name])}
    with alpha.client() as client:
        for doc_id, doc in documents.items():
            body = client.get(f"/usage/documents/{doc_id}").json()
            assert body == {
                "doc_id": doc_id,
                "workspace": "alpha",
                "status": doc["status"],
                "track_id": doc["track_id"],
                "file_path": doc["file_path"],
                "token_usage": doc["metadata"]["token_usage"],
            }

        batch_id = alpha_uploads["tracks"]["batch"]
        track = client.get(f"/usage/tracks/{batch_id}").json()
        assert track["track_id"] == batch_id and track["workspace"] == "alpha"
        assert [d["doc_id"] for d in track["documents"]] == sorted(
            d for d, doc in documents.items() if doc["track_id"] == batch_id)
        usages = [d["token_usage"] for d in track["documents"]]
        assert track["total"]["documents"] == 2
        for key in ("llm_input_tokens", "llm_output_tokens", "embedding_tokens",
                    "total_tokens", "llm_calls", "embedding_calls"):
            assert track["total"][key] == sum(u[key] for u in usages)

        summary = client.get("/usage/summary").json()
        (row,) = summary["rows"]
        every = [d["metadata"]["token_usage"] for d in documents.values()]
        assert row["documents"] == len(every) == 5
        assert row["total_tokens"] == sum(u["total_tokens"] for u in every)
        assert row["incomplete_documents"] == 1 and row["estimated_documents"] == 1

        by_model = {r["key"]: r for r in client.get(
            "/usage/summary", params={"group_by": "model"}).json()["rows"]}
        assert set(by_model) == {"fake-chat", "fake-embed"}
        assert by_model["fake-chat"]["llm_input_tokens"] == sum(
            u["llm_input_tokens"] for u in every)
        assert by_model["fake-embed"]["embedding_tokens"] == sum(
            u["embedding_tokens"] for u in every)

        by_track = client.get("/usage/summary", params={"group_by": "track_id"}).json()
        assert {r["key"] for r in by_track["rows"]} == set(alpha_uploads["tracks"].values())

        today = dt.datetime.now(dt.timezone.utc).date().isoformat()
        by_day = client.get("/usage/summary", params={"group_by": "day"}).json()
        assert [r["key"] for r in by_day["rows"]] == [today]

        one_track = client.get("/usage/summary", params={"track_id": batch_id}).json()
        assert one_track["rows"][0]["total_tokens"] == track["total"]["total_tokens"]

        later = int(time.time()) + 3600
        assert client.get("/usage/summary", params={"since": later}).json()["rows"] == []
        assert client.get("/usage/summary", params={"until": today}).json()["rows"] == []
        tomorrow = (dt.date.today() + dt.timedelta(days=2)).isoformat()
        window = client.get("/usage/summary",
                            params={"since": "2020-01-01T00:00:00Z", "until": tomorrow}).json()
        assert window["rows"][0]["documents"] == 5
        assert window["since"] == 1577836800

        assert client.get("/usage/summary", params={"since": "last tuesday"}).status_code == 422
        assert client.get("/usage/summary", params={"group_by": "user"}).status_code == 422
        assert client.get("/usage/documents/doc-nope").status_code == 404
        empty = client.get("/usage/tracks/no-such-track").json()
        assert empty["documents"] == [] and empty["total"]["documents"] == 0


def _login(server: LightRAGServer) -> str:
    response = httpx.post(f"{server.url}/login",
                          data={"username": ALPHA_ACCOUNT[0], "password": ALPHA_ACCOUNT[1]})
    response.raise_for_status()
    return str(response.json()["access_token"])


def test_usage_endpoints_use_lightrag_authentication(
        alpha: LightRAGServer, alpha_uploads: dict[str, Any]) -> None:
    doc = alpha_uploads["documents"]["single"][0]
    ours = [f"/usage/documents/{doc['id']}", f"/usage/tracks/{doc['track_id']}",
            "/usage/summary"]
    lightrags = f"/documents/track_status/{doc['track_id']}"
    token = _login(alpha)
    credentials: dict[str, dict[str, str]] = {
        "none": {},
        "wrong key": {"X-API-Key": "not-the-key"},
        "forged bearer": {"Authorization": "Bearer not.a.jwt"},
        "key": {"X-API-Key": ALPHA_KEY},
        "login": {"Authorization": f"Bearer {token}"},
    }
    for label, headers in credentials.items():
        expected = httpx.get(alpha.url + lightrags, headers=headers).status_code
        for path in ours:
            got = httpx.get(alpha.url + path, headers=headers).status_code
            assert got == expected, (label, path)
        if label in ("key", "login"):
            assert expected == 200
        else:
            assert expected in (401, 403), label


def test_usage_endpoints_are_in_the_openapi_schema(alpha: LightRAGServer) -> None:
    schema = httpx.get(f"{alpha.url}/openapi.json").json()
    lightrags = schema["paths"]["/documents/track_status/{track_id}"]["get"]
    for path in USAGE_PATHS:
        operation = schema["paths"][path]["get"]
        assert operation["security"] == lightrags["security"]  # X-API-Key and OAuth2
        assert operation["tags"] == ["usage"]
        assert "200" in operation["responses"]
    assert {"DocumentUsageOut", "TokenUsageOut", "TrackUsageOut",
            "UsageSummaryOut"} <= set(schema["components"]["schemas"])


def test_workspace_header_cannot_select_another_workspace(
        alpha: LightRAGServer, alpha_uploads: dict[str, Any]) -> None:
    doc = alpha_uploads["documents"]["single"][0]
    paths = [f"/usage/documents/{doc['id']}", f"/usage/tracks/{doc['track_id']}",
             "/usage/summary"]
    with alpha.client() as client:
        for path in paths:
            for other in ("beta", "legacy", "alpha/../beta", "ALPHA"):
                response = client.get(path, headers={"LIGHTRAG-WORKSPACE": other})
                assert response.status_code == 400, (path, other)
                assert "alpha" in response.json()["detail"]
            same = client.get(path, headers={"LIGHTRAG-WORKSPACE": "alpha"})
            assert same.status_code == 200


def test_streamed_query_asks_the_provider_for_usage(
        alpha: LightRAGServer, alpha_uploads: dict[str, Any], provider: FakeProvider) -> None:
    marker = new_marker("q")
    with alpha.client() as client:
        response = client.post("/query/stream", json={
            "query": f"Who works at Works? ({marker})", "mode": "local", "stream": True})
        assert response.status_code == 200
        assert response.text
    streamed = [e for e in provider.log()
                if e["kind"] == "chat" and marker in e["markers"] and e["stream"]]
    assert streamed, "the query's answer was not streamed"
    assert all(e["include_usage"] for e in streamed)
