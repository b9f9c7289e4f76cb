"""In-process checks of the serve helpers and of ``usage_router`` on a user's own app."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.testclient import TestClient
from tokmeter.backends import JsonUsageStore

from tokmeter import UsageRecord
from tokmeter._cli import build_parser
from tokmeter._serve import meter_role_function
from tokmeter.api import parse_time, usage_router
from tokmeter.testing import capture_usage


def test_cli_hands_every_argument_to_lightrag() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--port", "9700", "--workers", "2", "--key", "k"])
    assert args.command == "serve" and args.server_args == ["--port", "9700", "--workers",
                                                            "2", "--key", "k"]
    args = parser.parse_args(["-v", "serve-gunicorn", "--workers", "2"])
    assert args.verbose and args.server_args == ["--workers", "2"]
    assert parser.parse_args(["serve", "--help"]).server_args == ["--help"]


class RoleFunction:
    """Stands in for a server role function: forwards **kwargs to a 'binding'."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, prompt: str, system_prompt: str | None = None,
                       history_messages: list[Any] | None = None, **kwargs: Any) -> str:
        self.calls.append(kwargs)
        tracker = kwargs.get("token_tracker")
        if tracker is not None:
            tracker.add_usage({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18})
        return "an answer"


@pytest.mark.parametrize(("binding", "reports"), [
    ("openai", True), ("azure_openai", True), ("gemini", True), ("ollama", True),
    ("bedrock", False), ("lollms", False),
])
async def test_token_tracker_only_for_bindings_that_take_one(binding: str,
                                                              reports: bool) -> None:
    inner = RoleFunction()

    async def raw(prompt: str, system_prompt: str | None = None,
                  history_messages: list[Any] | None = None, **kwargs: Any) -> str:
        return await inner(prompt, system_prompt, history_messages, **kwargs)

    func = meter_role_function(raw, binding=binding, model="m-1")
    with capture_usage() as captured:
        assert await func("What is Acme?", system_prompt="Be brief.") == "an answer"
    assert ("token_tracker" in inner.calls[0]) is reports
    usage = captured.usage
    assert usage.llm_calls == 1 and usage.llm_model == "m-1"
    if reports:
        assert (usage.llm_input_tokens, usage.llm_output_tokens) == (11, 7)
        assert usage.estimated is False
    else:
        assert usage.estimated is True and usage.llm_input_tokens > 0
    assert meter_role_function(func, binding=binding, model="m-1") is func  # never twice


@pytest.mark.parametrize(("binding", "env", "asked"), [
    ("openai", None, True), ("azure_openai", None, True), ("openai", "0", False),
    ("openai", "false", False), ("gemini", None, False), ("ollama", None, False),
])
async def test_streams_ask_openai_for_usage_unless_switched_off(
        binding: str, env: str | None, asked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if env is None:
        monkeypatch.delenv("TOKMETER_STREAM_USAGE", raising=False)
    else:
        monkeypatch.setenv("TOKMETER_STREAM_USAGE", env)
    inner = RoleFunction()

    async def raw(prompt: str, **kwargs: Any) -> str:
        return await inner(prompt, **kwargs)

    func = meter_role_function(raw, binding=binding, model="m-1")
    with capture_usage():
        await func("q", stream=True)
        await func("q")
    streamed, plain = inner.calls
    assert (streamed.get("stream_options") == {"include_usage": True}) is asked
    assert "stream_options" not in plain


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("", None), ("1700000000", 1700000000), ("1700000000.9", 1700000000),
    ("2024-01-01", 1704067200), ("2024-01-01T00:00:00Z", 1704067200),
    ("2024-01-01T02:00:00+02:00", 1704067200), ("2024-01-01T00:00:00", 1704067200),
])
def test_parse_time(value: str | None, expected: int | None) -> None:
    assert parse_time(value, "since") == expected


def test_parse_time_names_the_bad_value() -> None:
    with pytest.raises(ValueError, match="since='yesterday'"):
        parse_time("yesterday", "since")


def write_doc_status(working_dir: Path, workspace: str) -> dict[str, Any]:
    record = UsageRecord(llm_input_tokens=120, llm_output_tokens=30, llm_calls=2,
                         embedding_tokens=50, embedding_calls=1, llm_model="gpt-4o-mini",
                         processing_start_time=1704067200, processing_end_time=1704067260,
                         run_id="r1", revision=3).to_dict()
    rows = {
        "doc-1": {"status": "processed", "track_id": "t-1", "file_path": "a.txt",
                  "content_summary": "a", "content_length": 1, "chunks_count": 1,
                  "created_at": "2024-01-01T00:00:00+00:00",
                  "updated_at": "2024-01-01T00:01:00+00:00",
                  "metadata": {"token_usage": record}},
        "doc-2": {"status": "processed", "track_id": "t-1", "file_path": "b.txt",
                  "content_summary": "b", "content_length": 1, "chunks_count": 1,
                  "created_at": "2024-01-01T00:00:00+00:00",
                  "updated_at": "2024-01-01T00:01:00+00:00", "metadata": {}},
    }
    target = working_dir / workspace / "kv_store_doc_status.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(rows))
    return record


def test_usage_router_on_your_own_app(tmp_path: Path) -> None:
    workspace = f"w{uuid.uuid4().hex[:10]}"
    record = write_doc_status(tmp_path, workspace)

    async def make_store() -> JsonUsageStore:
        return JsonUsageStore(tmp_path, workspace)

    def require_token(authorization: str = Header("")) -> None:
        if authorization != "Bearer ok":
            raise HTTPException(status_code=401, detail="no")

    app = FastAPI()
    app.include_router(usage_router(make_store, dependencies=[Depends(require_token)],
                                    prefix="/billing"))
    with TestClient(app, headers={"Authorization": "Bearer ok"}) as client:
        body = client.get("/billing/documents/doc-1").json()
        assert body["workspace"] == workspace and body["token_usage"] == record
        assert client.get("/billing/documents/doc-2").json()["token_usage"] is None
        track = client.get("/billing/tracks/t-1").json()
        assert [d["doc_id"] for d in track["documents"]] == ["doc-1", "doc-2"]
        assert track["total"]["documents"] == 1 and track["total"]["total_tokens"] == 200
        (row,) = client.get("/billing/summary", params={"group_by": "day"}).json()["rows"]
        assert row["key"] == "2024-01-01" and row["llm_calls"] == 2
        assert client.get("/billing/summary", headers={"LIGHTRAG-WORKSPACE": "other"}
                          ).status_code == 400
        assert client.get("/billing/summary", headers={"LIGHTRAG-WORKSPACE": workspace}
                          ).status_code == 200
        assert client.get("/billing/summary", headers={"Authorization": "Bearer no"}
                          ).status_code == 401


def test_usage_router_reports_a_missing_workspace(tmp_path: Path) -> None:
    app = FastAPI()
    app.include_router(usage_router(JsonUsageStore(tmp_path, "nowhere"), dependencies=[]))
    with TestClient(app) as client:
        response = client.get("/usage/summary")
    assert response.status_code == 404
    assert "no LightRAG doc-status data for workspace 'nowhere'" in response.json()["detail"]


def test_usage_router_takes_lightrag_auth_or_yours_not_both(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        usage_router(JsonUsageStore(tmp_path, ""), api_key="k", dependencies=[])


async def test_server_lightrag_meters_roles_rebuilt_at_run_time(tmp_path: Path) -> None:
    import numpy as np
    from lightrag import LightRAG
    from lightrag.llm_roles import RoleLLMConfig
    from lightrag.utils import EmbeddingFunc

    from tokmeter import instrumentation_of
    from tokmeter._metered import spec_of
    from tokmeter._serve import metered_lightrag_class

    def role_function_for(model: str) -> Any:
        async def complete(prompt: str, system_prompt: str | None = None,
                           history_messages: list[Any] | None = None, **kwargs: Any) -> str:
            kwargs["token_tracker"].add_usage({"prompt_tokens": 5, "completion_tokens": 2})
            return f"answer from {model}"
        return complete

    async def embed(texts: list[str], **kwargs: Any) -> Any:
        return np.zeros((len(texts), 8), dtype=np.float32)

    metered_lightrag = metered_lightrag_class(LightRAG)
    rag = metered_lightrag(
        working_dir=str(tmp_path), workspace=f"w{uuid.uuid4().hex[:10]}",
        llm_model_func=role_function_for("base"), llm_model_name="base",
        embedding_func=EmbeddingFunc(embedding_dim=8, func=embed, model_name="emb-1"),
        role_llm_configs={"query": RoleLLMConfig(func=role_function_for("m-a"), metadata={
            "binding": "openai", "base_binding": "openai", "model": "m-a"})},
    )
    rag.register_role_llm_builder(lambda role, meta: (role_function_for(meta["model"]), {}))
    assert instrumentation_of(rag) is not None
    assert spec_of(rag.embedding_func.func) is not None
    assert spec_of(rag._role_llm_states["query"].raw_func) is None  # LightRAG's own state

    with capture_usage() as captured:
        assert await rag.role_llm_funcs["query"]("hi") == "answer from m-a"
    await rag.aupdate_llm_role_config("query", model="m-b")
    with capture_usage() as rebuilt:
        assert await rag.role_llm_funcs["query"]("hi") == "answer from m-b"
    for wrapped in rag.role_llm_funcs.values():
        await rag._shutdown_llm_wrapper(wrapped)

    assert [(c.model, c.input_tokens, c.output_tokens, c.estimated)
            for c in captured.calls] == [("m-a", 5, 2, False)]
    assert [(c.model, c.input_tokens, c.output_tokens, c.estimated)
            for c in rebuilt.calls] == [("m-b", 5, 2, False)]
