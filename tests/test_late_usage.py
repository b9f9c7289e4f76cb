"""Usage that arrives after a document's terminal write is retried, delivered, or reported."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import tokmeter
from tests.conftest import STORE_KINDS
from tests.scripted import ScriptedModels, document_text, marker

pytestmark = pytest.mark.parametrize("store_kind", STORE_KINDS, indirect=True)


def meter(models: ScriptedModels) -> tuple[Any, Any]:
    return (tokmeter.metered("llm", model="m", encoding="o200k_base")(models.llm),
            tokmeter.metered("embedding", model="e", encoding="o200k_base")(models.embed))


async def test_late_embedding_usage_reaches_the_store_despite_write_failures(
        make_rag: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    models = ScriptedModels(fail_marker=marker(1))
    rag = await make_rag(*meter(models))
    instrumentation = tokmeter.instrumentation_of(rag)
    instrumentation.retry_delays = (0.01, 0.01, 0.01)
    store = instrumentation.store
    real_write = store.write_usage
    attempts: list[str] = []

    async def flaky_write(doc_id: str, record: Any) -> bool:
        attempts.append(doc_id)
        if len(attempts) <= 2:
            raise ConnectionError("store briefly unreachable")
        return await real_write(doc_id, record)

    monkeypatch.setattr(store, "write_usage", flaky_write)
    track_id = await rag.ainsert([document_text(i, 6) for i in range(4)],
                                 ids=[marker(i) for i in range(4)])
    assert await instrumentation.flush() is True
    assert instrumentation.undelivered() == {}
    docs = await rag.aget_docs_by_track_id(track_id)
    failed = docs[marker(1)].metadata["token_usage"]
    # the failed document's chunks were embedded by a sibling's flush, after its FAILED write
    assert marker(1) in attempts and len(attempts) >= 3
    assert failed["embedding_tokens"] == models.embedding_truth()[marker(1)]
    assert failed["complete"] is False


async def test_late_usage_that_cannot_be_written_is_kept_and_reported(
        make_rag: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    models = ScriptedModels(fail_marker=marker(1))
    rag = await make_rag(*meter(models))
    instrumentation = tokmeter.instrumentation_of(rag)
    instrumentation.retry_delays = (0.01, 0.01)

    async def broken_write(doc_id: str, record: Any) -> bool:
        raise ConnectionError("store down")

    monkeypatch.setattr(instrumentation.store, "write_usage", broken_write)
    with caplog.at_level(logging.ERROR, logger="tokmeter"):
        await rag.ainsert([document_text(i, 6) for i in range(4)],
                          ids=[marker(i) for i in range(4)])
        assert await instrumentation.flush(timeout=5) is False
    kept = instrumentation.undelivered()
    assert marker(1) in kept
    assert kept[marker(1)].embedding_tokens == models.embedding_truth()[marker(1)]
    assert f"could not write late usage of {marker(1)}" in caplog.text

    monkeypatch.undo()  # the store is back: flush() retries and delivers
    assert await instrumentation.flush() is True
    docs = await rag.aget_docs_by_track_id(
        (await rag.doc_status.get_by_id(marker(1)))["track_id"])
    stored = docs[marker(1)].metadata["token_usage"]
    assert stored["embedding_tokens"] == models.embedding_truth()[marker(1)]

    with caplog.at_level(logging.ERROR, logger="tokmeter"):
        instrumentation._report_unwritten_at_exit()  # nothing left to report now
    assert "process exits with usage" not in caplog.text
