"""instrument() / uninstrument(): idempotence, version range, the context self-test."""

from __future__ import annotations

from typing import Any

import pytest

import tokmeter
import tokmeter._instrument as instrument_module
from tests.scripted import ScriptedModels, document_text, marker


def metered_models() -> tuple[ScriptedModels, Any, Any]:
    models = ScriptedModels()
    llm = tokmeter.metered("llm", model="m", encoding="o200k_base")(models.llm)
    embed = tokmeter.metered("embedding", model="e", encoding="o200k_base")(models.embed)
    return models, llm, embed


async def test_instrument_is_idempotent_and_uninstrument_restores(make_rag: Any) -> None:
    _, llm, embed = metered_models()
    rag = await make_rag(llm, embed, instrument=False)
    original_upsert = rag.doc_status.upsert
    first = tokmeter.instrument(rag)
    with pytest.warns(UserWarning, match="already instrumented"):
        assert tokmeter.instrument(rag) is first
    assert tokmeter.instrumentation_of(rag) is first
    assert rag.doc_status.upsert != original_upsert

    tokmeter.uninstrument(rag)
    assert tokmeter.instrumentation_of(rag) is None
    assert rag.doc_status.upsert == original_upsert
    assert "process_single_document" not in vars(rag)
    with pytest.warns(UserWarning, match="not instrumented"):
        tokmeter.uninstrument(rag)

    # documents processed without tokmeter look exactly as before: no token_usage
    track_id = await rag.ainsert([document_text(1, 2)], ids=[marker(1)])
    docs = await rag.aget_docs_by_track_id(track_id)
    assert "token_usage" not in docs[marker(1)].metadata


def test_unsupported_lightrag_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightrag

    monkeypatch.setattr(lightrag, "__version__", "1.4.9")
    with pytest.raises(tokmeter.IncompatibleLightRAGError, match=r">=1.5,<1.6, found 1.4.9"):
        tokmeter.instrument(object())


def test_something_that_is_not_lightrag_is_refused() -> None:
    with pytest.raises(tokmeter.InstrumentationError, match="needs a lightrag.LightRAG"):
        tokmeter.instrument(object())


def test_self_test_fails_loudly_when_context_does_not_propagate(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import lightrag.utils

    def context_dropping_queue(max_size: int, **kwargs: Any) -> Any:
        def decorate(func: Any) -> Any:
            async def call(*args: Any, **kw: Any) -> Any:
                import contextvars
                import threading

                # run the function in a fresh, empty context, as LightRAG 1.4 did
                result: dict[str, Any] = {}

                def target() -> None:
                    import asyncio

                    result["value"] = asyncio.run(func(*args, **kw))

                thread = threading.Thread(target=contextvars.Context().run, args=(target,))
                thread.start()
                thread.join()
                return result["value"]

            return call

        return decorate

    monkeypatch.setattr(lightrag.utils, "priority_limit_async_func_call", context_dropping_queue)
    monkeypatch.setattr(instrument_module, "_selftest_passed", False)
    with pytest.raises(tokmeter.InstrumentationError, match="did not reach it"):
        instrument_module.self_test_context_propagation()
