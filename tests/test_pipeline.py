"""tokmeter on LightRAG 1.5.7's real ingestion pipeline, with scripted models."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tokmeter
from tests.conftest import STORE_KINDS
from tests.scripted import ScriptedModels, document_text, marker

pytestmark = pytest.mark.parametrize("store_kind", STORE_KINDS, indirect=True)


def meter(models: ScriptedModels, *, llm_model: str = "scripted-llm",
          emb_model: str = "scripted-embedder") -> tuple[Any, Any]:
    llm = tokmeter.metered("llm", model=llm_model, encoding="o200k_base")(models.llm)
    embed = tokmeter.metered("embedding", model=emb_model, encoding="o200k_base")(models.embed)
    return llm, embed


async def usage_by_doc(rag: Any, track_id: str) -> dict[str, dict[str, Any]]:
    docs = await rag.aget_docs_by_track_id(track_id)
    return {doc_id: status.metadata.get("token_usage") for doc_id, status in docs.items()}


async def ingest(rag: Any, count: int, *, first: int = 0, sentences: Any = None) -> str:
    sizes = sentences or (lambda i: 2 + (i * 5) % 11)
    texts = [document_text(i, sizes(i)) for i in range(first, first + count)]
    ids = [marker(i) for i in range(first, first + count)]
    return str(await rag.ainsert(texts, ids=ids, file_paths=[f"{d}.txt" for d in ids]))


async def test_concurrent_documents_get_exactly_their_own_usage(make_rag: Any) -> None:
    models = ScriptedModels(embedding_extra=0, delay=0.002)
    rag = await make_rag(*meter(models))
    track_id = await ingest(rag, 10)
    await tokmeter.instrumentation_of(rag).flush()
    usage = await usage_by_doc(rag, track_id)

    llm_truth = models.llm_truth()
    emb_truth = models.embedding_truth()
    assert sorted(usage) == [marker(i) for i in range(10)]
    for doc_id, record in usage.items():
        assert record is not None, doc_id
        assert record["llm_input_tokens"] == llm_truth[doc_id]["in"], doc_id
        assert record["llm_output_tokens"] == llm_truth[doc_id]["out"], doc_id
        assert record["llm_calls"] == llm_truth[doc_id]["calls"], doc_id
        assert record["embedding_tokens"] == emb_truth[doc_id], doc_id
        assert record["total_tokens"] == (record["llm_input_tokens"]
                                          + record["llm_output_tokens"]
                                          + record["embedding_tokens"])
        assert record["estimated"] is False and record["complete"] is True
        assert record["total_chunks"] >= 1
        assert record["llm_model"] == "scripted-llm"
        assert record["embedding_model"] == "scripted-embedder"
        assert record["models"]["scripted-llm"]["calls"] == record["llm_calls"]
    assert sum(r["embedding_tokens"] for r in usage.values()) == models.embedding_total()
    # Several documents' texts were embedded in one batch: attribution by owner held.
    assert any(len({d[0] for d, _ in [(t[0], t[1]) for t in b["texts"]]}) > 1
               for b in models.embedding_batches)
    assert tokmeter.unattributed_usage().total_tokens == 0


async def test_batch_totals_are_split_so_documents_add_up(make_rag: Any) -> None:
    models = ScriptedModels(embedding_extra=5)
    rag = await make_rag(*meter(models))
    track_id = await ingest(rag, 8)
    await tokmeter.instrumentation_of(rag).flush()
    usage = await usage_by_doc(rag, track_id)
    truth = models.embedding_truth()
    assert sum(r["embedding_tokens"] for r in usage.values()) == models.embedding_total()
    for doc_id, record in usage.items():
        # each document's share is its texts' count plus at most its part of the extras
        assert 0 <= record["embedding_tokens"] - truth[doc_id] <= 5 * record["embedding_calls"]


async def test_failed_document_keeps_partial_usage(make_rag: Any) -> None:
    models = ScriptedModels(fail_marker=marker(2))
    rag = await make_rag(*meter(models))
    track_id = await ingest(rag, 5)
    await tokmeter.instrumentation_of(rag).flush()
    usage = await usage_by_doc(rag, track_id)
    docs = await rag.aget_docs_by_track_id(track_id)

    failed = docs[marker(2)]
    assert str(getattr(failed.status, "value", failed.status)) == "failed"
    record = usage[marker(2)]
    # LightRAG's own metadata keys survive, also after late usage was merged in
    assert {"process_start_time", "process_end_time"} <= set(failed.metadata)
    truth = models.llm_truth()[marker(2)]
    assert record["complete"] is False
    assert any("document failed" in f for f in record["faults"])
    assert record["llm_calls"] == truth["calls"] >= 1
    assert record["llm_input_tokens"] > 0          # the failed attempts' input is billed
    assert record["estimated"] is True              # ...as an estimate
    for i in (0, 1, 3, 4):
        assert usage[marker(i)]["complete"] is True
        assert usage[marker(i)]["llm_input_tokens"] == models.llm_truth()[marker(i)]["in"]
    # every embedded text is billed to its own document, also the failed one's
    emb = models.embedding_truth()
    assert {d: r["embedding_tokens"] for d, r in usage.items()} == {
        d: emb.get(d, 0) for d in usage
    }


async def test_empty_document_is_marked(make_rag: Any) -> None:
    models = ScriptedModels()
    rag = await make_rag(*meter(models))
    track_id = await rag.ainsert(["", document_text(1, 3)], ids=["empty-doc", marker(1)])
    usage = await usage_by_doc(rag, track_id)
    empty = usage["empty-doc"]
    assert empty["total_chunks"] == 0
    assert empty["total_tokens"] == 0 and empty["llm_calls"] == 0
    assert any("empty document" in f for f in empty["faults"])
    assert usage[marker(1)]["total_tokens"] > 0


async def test_model_without_usage_is_estimated_and_flagged(make_rag: Any) -> None:
    models = ScriptedModels(report_usage=False)
    rag = await make_rag(*meter(models))
    track_id = await ingest(rag, 3)
    usage = await usage_by_doc(rag, track_id)
    for doc_id, record in usage.items():
        assert record["estimated"] is True
        assert record["llm_input_tokens"] > 0 and record["llm_output_tokens"] > 0
        # with no provider figure, embedding tokens are the local count of its texts
        assert record["embedding_tokens"] == models.embedding_truth()[doc_id]


async def test_sync_model_functions_run_in_threads_keep_attribution(make_rag: Any) -> None:
    models = ScriptedModels()
    sync_llm = tokmeter.metered("llm", model="sync-llm", encoding="o200k_base")(models.llm_sync)

    async def llm(prompt: str, **kwargs: Any) -> str:
        # the usual way to use a blocking client from LightRAG: a worker thread
        return await asyncio.to_thread(sync_llm, prompt, **kwargs)

    embed = tokmeter.metered("embedding", model="emb", encoding="o200k_base")(models.embed)
    rag = await make_rag(llm, embed)
    track_id = await ingest(rag, 6)
    usage = await usage_by_doc(rag, track_id)
    truth = models.llm_truth()
    for doc_id, record in usage.items():
        assert record["llm_input_tokens"] == truth[doc_id]["in"], doc_id
        assert record["llm_output_tokens"] == truth[doc_id]["out"], doc_id
        assert record["llm_model"] == "sync-llm"


async def test_retried_calls_are_all_billed(make_rag: Any) -> None:
    models = ScriptedModels(flaky_first_attempt=True)
    metered_llm = tokmeter.metered("llm", model="flaky", encoding="o200k_base")(models.llm)

    async def llm_with_retry(*args: Any, **kwargs: Any) -> str:
        for attempt in range(3):
            try:
                return await metered_llm(*args, **kwargs)
            except ConnectionError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    embed = tokmeter.metered("embedding", model="emb", encoding="o200k_base")(models.embed)
    rag = await make_rag(llm_with_retry, embed)
    track_id = await ingest(rag, 4)
    usage = await usage_by_doc(rag, track_id)
    truth = models.llm_truth()
    for doc_id, record in usage.items():
        assert truth[doc_id]["failed"] >= 1
        assert record["llm_calls"] == truth[doc_id]["calls"]        # failed attempts count
        assert record["llm_input_tokens"] > truth[doc_id]["in"]     # and are billed
        assert record["llm_output_tokens"] == truth[doc_id]["out"]  # a failure produced no output
        assert record["complete"] is True


async def test_reingest_served_from_llm_cache_counts_hits_not_tokens(make_rag: Any) -> None:
    models = ScriptedModels()
    rag = await make_rag(*meter(models))
    await ingest(rag, 3)
    calls_before = len(models.llm_log)
    for i in range(3):
        await rag.adelete_by_doc_id(marker(i))
    track_id = await ingest(rag, 3)
    usage = await usage_by_doc(rag, track_id)
    assert len(models.llm_log) == calls_before  # the model was not called again
    for record in usage.values():
        assert record["llm_calls"] == 0
        assert record["llm_cache_hits"] >= 1
        assert record["llm_input_tokens"] == 0 and record["llm_output_tokens"] == 0
        assert record["embedding_tokens"] > 0   # embeddings are not cached


async def test_usage_survives_reopening_in_a_new_process(make_rag: Any, tmp_path: Any,
                                                         workspace: str, store_kind: str) -> None:
    models = ScriptedModels()
    rag = await make_rag(*meter(models))
    track_id = await ingest(rag, 3)
    expected = await usage_by_doc(rag, track_id)
    await rag.finalize_storages()
    script = (
        "import asyncio, json, sys\n"
        "from tests.reopen import read_track\n"
        "print(json.dumps(asyncio.run(read_track(*sys.argv[1:]))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, store_kind, str(tmp_path / "rag"), workspace, track_id],
        capture_output=True, text=True, timeout=120, check=True,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == expected


async def test_metering_fault_never_breaks_ingestion(make_rag: Any, monkeypatch: Any) -> None:
    models = ScriptedModels(report_usage=False)
    rag = await make_rag(*meter(models))

    def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr("tokmeter._metered.count_tokens", broken)
    track_id = await ingest(rag, 2)
    docs = await rag.aget_docs_by_track_id(track_id)
    for status in docs.values():
        assert str(getattr(status.status, "value", status.status)) == "processed"
        record = status.metadata["token_usage"]
        assert record["complete"] is False
        assert any("tokenizer exploded" in f for f in record["faults"])


async def test_queries_are_metered_to_the_query_tally_never_to_documents(make_rag: Any) -> None:
    from lightrag import QueryParam

    models = ScriptedModels()

    async def streaming_llm(prompt: str, system_prompt: str | None = None,
                            history_messages: Any = None, token_tracker: Any = None,
                            stream: bool = False, **kwargs: Any) -> Any:
        if not stream:
            return await models.llm(prompt, system_prompt, history_messages, token_tracker)

        async def chunks() -> Any:
            for part in ("The answer ", "is ", "forty-two."):
                yield part
            token_tracker.add_usage({"prompt_tokens": 321, "completion_tokens": 4,
                                     "total_tokens": 325})
        return chunks()

    llm = tokmeter.metered("llm", model="q-llm", encoding="o200k_base")(streaming_llm)
    embed = tokmeter.metered("embedding", model="q-emb", encoding="o200k_base")(models.embed)
    rag = await make_rag(llm, embed)
    track_id = await ingest(rag, 3)
    before = await usage_by_doc(rag, track_id)

    answer = await rag.aquery("What does DOC001 plan?",
                              param=QueryParam(mode="naive", stream=True))
    text = "".join([part async for part in answer])
    assert text == "The answer is forty-two."

    queries = tokmeter.instrumentation_of(rag).query_usage()
    assert (queries.llm_input_tokens, queries.llm_output_tokens) == (321, 4)
    assert queries.estimated is False
    assert queries.embedding_tokens > 0          # the query text was embedded
    assert await usage_by_doc(rag, track_id) == before
    assert tokmeter.unattributed_usage().total_tokens == 0

    async with tokmeter.scope("my-report") as mine:  # a scope of the caller's wins
        await rag.aquery("DOC002?", param=QueryParam(mode="naive", stream=False))
    assert mine.snapshot().llm_calls == 1
    assert tokmeter.instrumentation_of(rag).query_usage().llm_calls == 1
