"""The usage-store contract, run against every backend (see ``conftest.BACKENDS``)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from tokmeter.backends import UsageTotals

from tests.backends.conftest import Backend, doc_status, other_metadata
from tokmeter._record import ModelUsage, UsageRecord
from tokmeter.errors import InvalidWorkspaceError, StoreError

DAY1 = int(dt.datetime(2025, 3, 1, 23, 59, 59, tzinfo=dt.timezone.utc).timestamp())
DAY2 = int(dt.datetime(2025, 3, 2, 0, 0, 0, tzinfo=dt.timezone.utc).timestamp())
DAY3 = int(dt.datetime(2025, 3, 3, 12, 0, 0, tzinfo=dt.timezone.utc).timestamp())

LLM = "gpt-4.1-mini"  # a dot: not usable as a MongoDB field path
EMB = "text-embedding-3-small"


def usage(
    llm_in: int | None = 100,
    llm_out: int | None = 20,
    emb: int | None = 50,
    *,
    run_id: str = "run-1",
    revision: int = 1,
    ended: int | None = DAY1,
    estimated: bool = False,
    complete: bool = True,
    llm_calls: int = 2,
    emb_calls: int = 1,
    cache_hits: int = 0,
    llm_model: str = LLM,
) -> UsageRecord:
    return UsageRecord(
        llm_input_tokens=llm_in,
        llm_output_tokens=llm_out,
        llm_calls=llm_calls,
        llm_cache_hits=cache_hits,
        embedding_tokens=emb,
        embedding_calls=emb_calls,
        total_chunks=3,
        llm_model=llm_model,
        embedding_model=EMB,
        models={
            llm_model: ModelUsage(kind="llm", input_tokens=llm_in, output_tokens=llm_out,
                                  calls=llm_calls),
            EMB: ModelUsage(kind="embedding", input_tokens=emb, output_tokens=0,
                            calls=emb_calls),
        },
        estimated=estimated,
        complete=complete,
        processing_start_time=None if ended is None else ended - 30,
        processing_end_time=ended,
        run_id=run_id,
        revision=revision,
    )


async def stored_metadata(backend: Backend, workspace: str, doc_id: str) -> dict[str, Any]:
    """The document's metadata as LightRAG itself reads it."""
    row = await backend.lightrag_row(workspace, doc_id)
    assert row is not None, f"LightRAG lost document {doc_id!r}"
    return dict(row["metadata"])


def without_usage(metadata: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k != "token_usage"}


class TestUsageStoreContract:
    """What every UsageStore must do, whatever LightRAG doc-status store is behind it."""

    # -- reading ---------------------------------------------------------------
    async def test_get_usage_returns_record_and_document_facts(
        self, backend: Backend, workspace: str
    ) -> None:
        record = usage()
        await backend.seed(workspace, {
            "doc-1": doc_status("track-1", record.to_dict(), file_path="a.pdf"),
            "doc-2": doc_status("track-1", None, status="failed"),
        })
        store = await backend.store(workspace)

        got = await store.get_usage("doc-1")
        assert got is not None
        assert got.usage == record
        assert (got.doc_id, got.status, got.track_id, got.file_path) == (
            "doc-1", "processed", "track-1", "a.pdf"
        )
        unmetered = await store.get_usage("doc-2")
        assert unmetered is not None and unmetered.usage is None
        assert unmetered.status == "failed"
        assert await store.get_usage("no-such-doc") is None

    async def test_usage_for_track_lists_only_that_track(
        self, backend: Backend, workspace: str
    ) -> None:
        await backend.seed(workspace, {
            "doc-b": doc_status("track-1", usage(run_id="b").to_dict()),
            "doc-a": doc_status("track-1", usage(run_id="a").to_dict()),
            "doc-c": doc_status("track-2", usage(run_id="c").to_dict()),
        })
        store = await backend.store(workspace)

        docs = await store.usage_for_track("track-1")
        assert [d.doc_id for d in docs] == ["doc-a", "doc-b"]
        assert [d.usage.run_id for d in docs if d.usage] == ["a", "b"]
        assert await store.usage_for_track("track-none") == []

    # -- write_usage -----------------------------------------------------------
    async def test_write_newer_revision_replaces_only_token_usage(
        self, backend: Backend, workspace: str
    ) -> None:
        await backend.seed(workspace, {"doc-1": doc_status("t", usage(revision=1).to_dict())})
        store = await backend.store(workspace)
        newer = usage(150, 30, 80, revision=5)

        assert await store.write_usage("doc-1", newer) is True

        got = await store.get_usage("doc-1")
        assert got is not None and got.usage == newer
        metadata = await stored_metadata(backend, workspace, "doc-1")
        assert metadata["token_usage"] == newer.to_dict()
        assert without_usage(metadata) == other_metadata()
        row = await backend.lightrag_row(workspace, "doc-1")
        assert row is not None and row["status"] == "processed" and row["track_id"] == "t"

    async def test_write_older_or_equal_revision_is_ignored_but_reported_done(
        self, backend: Backend, workspace: str
    ) -> None:
        stored = usage(revision=3)
        await backend.seed(workspace, {"doc-1": doc_status("t", stored.to_dict())})
        store = await backend.store(workspace)

        assert await store.write_usage("doc-1", usage(1, 1, 1, revision=3)) is True
        assert await store.write_usage("doc-1", usage(2, 2, 2, revision=2)) is True

        got = await store.get_usage("doc-1")
        assert got is not None and got.usage == stored

    async def test_write_is_refused_for_another_run_or_a_missing_record(
        self, backend: Backend, workspace: str
    ) -> None:
        stored = usage(run_id="run-1", revision=1)
        await backend.seed(workspace, {
            "doc-1": doc_status("t", stored.to_dict()),
            "doc-2": doc_status("t", None),
        })
        store = await backend.store(workspace)

        assert await store.write_usage("doc-1", usage(run_id="run-2", revision=9)) is False
        assert await store.write_usage("doc-2", usage(revision=9)) is False
        assert await store.write_usage("no-such-doc", usage(revision=9)) is False

        got = await store.get_usage("doc-1")
        assert got is not None and got.usage == stored
        assert await stored_metadata(backend, workspace, "doc-2") == other_metadata()

    async def test_write_without_run_id_is_an_error(
        self, backend: Backend, workspace: str
    ) -> None:
        await backend.seed(workspace, {"doc-1": doc_status("t", usage().to_dict())})
        store = await backend.store(workspace)
        with pytest.raises(StoreError, match="run_id"):
            await store.write_usage("doc-1", UsageRecord(revision=5))

    # -- merge_usage_delta -----------------------------------------------------
    async def test_merge_adds_exactly_and_keeps_everything_else(
        self, backend: Backend, workspace: str
    ) -> None:
        stored = usage(100, 20, 50, run_id="run-1", revision=4, cache_hits=1)
        await backend.seed(workspace, {"doc-1": doc_status("t", stored.to_dict())})
        store = await backend.store(workspace)

        merged = await store.merge_usage_delta("doc-1", {
            "llm_input_tokens": 7,
            "llm_output_tokens": 3,
            "llm_calls": 1,
            "llm_cache_hits": 2,
            "embedding_tokens": 11,
            "embedding_calls": 2,
            "models": {
                LLM: {"input_tokens": 7, "output_tokens": 3, "calls": 1},
                EMB: {"input_tokens": 11, "calls": 2},
                "$new.model": {"kind": "embedding", "input_tokens": 5, "calls": 1},
            },
        })
        assert merged is True

        metadata = await stored_metadata(backend, workspace, "doc-1")
        tu = metadata["token_usage"]
        expected_scalars = {
            "llm_input_tokens": 107, "llm_output_tokens": 23, "llm_calls": 3,
            "llm_cache_hits": 3, "embedding_tokens": 61, "embedding_calls": 3,
            "total_tokens": 191,  # derived from the token counts: 7 + 3 + 11
            "run_id": "run-1", "revision": 4, "llm_model": LLM, "total_chunks": 3,
        }
        assert {k: tu[k] for k in expected_scalars} == expected_scalars
        assert tu["models"] == {
            LLM: {"kind": "llm", "input_tokens": 107, "output_tokens": 23, "tokens": 130,
                  "calls": 3},
            EMB: {"kind": "embedding", "input_tokens": 61, "output_tokens": 0, "tokens": 61,
                  "calls": 3},
            "$new.model": {"kind": "embedding", "input_tokens": 5, "output_tokens": 0,
                           "tokens": 5, "calls": 1},
        }
        assert without_usage(metadata) == other_metadata()
        got = await store.get_usage("doc-1")
        assert got is not None and got.usage is not None
        assert got.usage.total_tokens == 191
        assert got.usage.models["$new.model"] == ModelUsage("embedding", 5, 0, 1)

    async def test_merge_keeps_unknown_counts_unknown(
        self, backend: Backend, workspace: str
    ) -> None:
        stored = usage(None, 20, 50)  # provider did not report prompt tokens
        await backend.seed(workspace, {"doc-1": doc_status("t", stored.to_dict())})
        store = await backend.store(workspace)

        assert await store.merge_usage_delta(
            "doc-1", {"llm_input_tokens": 5, "embedding_tokens": 4,
                      "models": {LLM: {"input_tokens": 5}}}
        ) is True

        got = await store.get_usage("doc-1")
        assert got is not None and got.usage is not None
        assert got.usage.llm_input_tokens is None
        assert got.usage.embedding_tokens == 54
        assert got.usage.total_tokens is None
        assert got.usage.models[LLM].input_tokens is None
        tu = (await stored_metadata(backend, workspace, "doc-1"))["token_usage"]
        assert tu["total_tokens"] is None and tu["models"][LLM]["tokens"] is None

    async def test_merge_is_refused_for_another_run_or_a_missing_record(
        self, backend: Backend, workspace: str
    ) -> None:
        stored = usage(run_id="run-1")
        await backend.seed(workspace, {
            "doc-1": doc_status("t", stored.to_dict()),
            "doc-2": doc_status("t", None),
        })
        store = await backend.store(workspace)
        delta = {"llm_calls": 1}

        assert await store.merge_usage_delta("doc-1", delta, run_id="run-2") is False
        assert await store.merge_usage_delta("doc-2", delta) is False
        assert await store.merge_usage_delta("no-such-doc", delta) is False
        got = await store.get_usage("doc-1")
        assert got is not None and got.usage == stored
        assert await stored_metadata(backend, workspace, "doc-2") == other_metadata()

        assert await store.merge_usage_delta("doc-1", delta, run_id="run-1") is True
        got = await store.get_usage("doc-1")
        assert got is not None and got.usage is not None and got.usage.llm_calls == 3

    async def test_concurrent_merges_all_land(self, backend: Backend, workspace: str) -> None:
        start = usage(emb=0, emb_calls=0)
        await backend.seed(workspace, {"doc-1": doc_status("t", start.to_dict())})
        store = await backend.store(workspace)

        results = await asyncio.gather(*(
            store.merge_usage_delta("doc-1", {
                "embedding_tokens": 3, "embedding_calls": 1,
                "models": {EMB: {"input_tokens": 3, "calls": 1}},
            })
            for _ in range(25)
        ))

        assert all(results)
        got = await store.get_usage("doc-1")
        assert got is not None and got.usage is not None
        assert (got.usage.embedding_tokens, got.usage.embedding_calls) == (75, 25)
        assert got.usage.models[EMB] == ModelUsage("embedding", 75, 0, 25)

    @pytest.mark.parametrize("delta, problem", [
        ({"llm_calls": -1}, "non-negative integer"),
        ({"llm_calls": 1.5}, "non-negative integer"),
        ({"llm_calls": True}, "non-negative integer"),
        ({"llm_calls": "1"}, "non-negative integer"),
        ({"run_id": "x"}, "unknown usage delta key"),
        ({"models": {"m": {"input_tokens": -2}}}, "non-negative integer"),
        ({"models": {"m": {"kind": "vlm"}}}, "'llm' or 'embedding'"),
        ({"models": {"m": {"prompt_tokens": 2}}}, "unknown key"),
        ({"models": ["m"]}, "must map model names"),
    ])
    async def test_merge_rejects_a_bad_delta(
        self, backend: Backend, workspace: str, delta: dict[str, Any], problem: str
    ) -> None:
        stored = usage()
        await backend.seed(workspace, {"doc-1": doc_status("t", stored.to_dict())})
        store = await backend.store(workspace)
        with pytest.raises(StoreError, match=problem):
            await store.merge_usage_delta("doc-1", delta)
        got = await store.get_usage("doc-1")
        assert got is not None and got.usage == stored

    # -- aggregate -------------------------------------------------------------
    async def _seed_for_totals(self, backend: Backend, workspace: str) -> None:
        await backend.seed(workspace, {
            "d1": doc_status("track-a", usage(100, 20, 50, ended=DAY1, cache_hits=1).to_dict()),
            "d2": doc_status("track-a", usage(10, 2, 5, ended=DAY2, estimated=True,
                                             llm_model="gpt-4o").to_dict()),
            # Unknown prompt tokens: counted as 0 there, and no total for this document.
            "d3": doc_status("track-b", usage(None, 7, 3, ended=DAY3, complete=False).to_dict()),
            "d4": doc_status("track-b", None),  # never metered: not a billed document
        })

    async def test_aggregate_totals(self, backend: Backend, workspace: str) -> None:
        await self._seed_for_totals(backend, workspace)
        store = await backend.store(workspace)

        assert await store.aggregate() == [UsageTotals(
            key=None, documents=3,
            llm_input_tokens=110, llm_output_tokens=29, embedding_tokens=58,
            total_tokens=170 + 17,
            llm_calls=6, embedding_calls=3, llm_cache_hits=1,
            estimated_documents=1, incomplete_documents=1,
        )]

    async def test_aggregate_by_model(self, backend: Backend, workspace: str) -> None:
        await self._seed_for_totals(backend, workspace)
        store = await backend.store(workspace)

        rows = {row.key: row for row in await store.aggregate(group_by="model")}
        assert list(rows) == sorted(rows)
        assert rows == {
            LLM: UsageTotals(key=LLM, documents=2, llm_input_tokens=100, llm_output_tokens=27,
                             total_tokens=127, llm_calls=4),
            "gpt-4o": UsageTotals(key="gpt-4o", documents=1, llm_input_tokens=10,
                                  llm_output_tokens=2, total_tokens=12, llm_calls=2),
            EMB: UsageTotals(key=EMB, documents=3, embedding_tokens=58, total_tokens=58,
                             embedding_calls=3),
        }

    async def test_aggregate_by_day_uses_utc_day_of_processing_end(
        self, backend: Backend, workspace: str
    ) -> None:
        await self._seed_for_totals(backend, workspace)
        store = await backend.store(workspace)

        rows = await store.aggregate(group_by="day")
        assert [(r.key, r.documents, r.total_tokens) for r in rows] == [
            ("2025-03-01", 1, 170), ("2025-03-02", 1, 17), ("2025-03-03", 1, 0),
        ]

    async def test_aggregate_by_track_and_for_one_track(
        self, backend: Backend, workspace: str
    ) -> None:
        await self._seed_for_totals(backend, workspace)
        store = await backend.store(workspace)

        rows = await store.aggregate(group_by="track_id")
        assert [(r.key, r.documents, r.llm_input_tokens, r.llm_output_tokens) for r in rows] == [
            ("track-a", 2, 110, 22), ("track-b", 1, 0, 7),
        ]
        only_b = await store.aggregate(track_id="track-b")
        assert [(r.documents, r.llm_output_tokens, r.incomplete_documents) for r in only_b] == [
            (1, 7, 1)
        ]
        assert await store.aggregate(track_id="no-such-track") == []

    async def test_aggregate_since_until(self, backend: Backend, workspace: str) -> None:
        await self._seed_for_totals(backend, workspace)
        store = await backend.store(workspace)

        async def docs(**kw: Any) -> int:
            rows = await store.aggregate(**kw)
            return sum(r.documents for r in rows)

        assert await docs(since=DAY2) == 2  # inclusive
        assert await docs(until=DAY2) == 1  # exclusive
        assert await docs(since=DAY1, until=DAY3) == 2
        assert await docs(since=dt.datetime(2025, 3, 2, tzinfo=dt.timezone.utc)) == 2
        assert await docs(since=dt.datetime(2025, 3, 2)) == 2  # naive = UTC
        assert await docs(since=DAY3 + 1) == 0
        by_day = await store.aggregate(since=DAY2, group_by="day", track_id="track-a")
        assert [(r.key, r.documents) for r in by_day] == [("2025-03-02", 1)]

    async def test_aggregate_of_an_empty_workspace_is_empty(
        self, backend: Backend, workspace: str
    ) -> None:
        await backend.seed(workspace, {"d": doc_status("t", None)})
        store = await backend.store(workspace)
        for group_by in (None, "model", "day", "track_id"):
            assert await store.aggregate(group_by=group_by) == []

    async def test_aggregate_rejects_unknown_grouping(
        self, backend: Backend, workspace: str
    ) -> None:
        await backend.seed(workspace, {"d": doc_status("t", None)})
        store = await backend.store(workspace)
        with pytest.raises(StoreError, match="group_by must be one of"):
            await store.aggregate(group_by="month")

    # -- workspaces ------------------------------------------------------------
    async def test_workspace_exists(self, backend: Backend, workspace: str) -> None:
        await backend.seed(workspace, {"d": doc_status("t", None)})
        assert await (await backend.store(workspace)).workspace_exists() is True
        missing = backend.standalone_store(workspace + "-never-used")
        try:
            assert await missing.workspace_exists() is False
        finally:
            await missing.close()

    async def test_workspaces_are_isolated(self, backend: Backend, workspace: str) -> None:
        first, second = workspace + "-one", workspace + "-two"
        one, two = usage(1, 1, 1, run_id="r1"), usage(500, 50, 5, run_id="r2", ended=DAY3)
        # Same doc ids and track ids in both workspaces of the same database.
        await backend.seed(first, {"doc-1": doc_status("track", one.to_dict())})
        await backend.seed(second, {"doc-1": doc_status("track", two.to_dict())})
        store_one = await backend.store(first)
        store_two = await backend.store(second)

        got = await store_one.get_usage("doc-1")
        assert got is not None and got.usage == one
        assert [d.usage for d in await store_one.usage_for_track("track")] == [one]

        assert await store_one.write_usage("doc-1", usage(9, 9, 9, run_id="r1", revision=7))
        assert await store_one.write_usage("doc-1", usage(run_id="r2", revision=9)) is False
        assert await store_one.merge_usage_delta("doc-1", {"llm_calls": 100})
        totals_one = await store_one.aggregate()
        assert [(t.documents, t.total_tokens, t.llm_calls) for t in totals_one] == [(1, 27, 102)]

        # Nothing of the above reached the second workspace.
        got = await store_two.get_usage("doc-1")
        assert got is not None and got.usage == two
        assert [d.usage for d in await store_two.usage_for_track("track")] == [two]
        assert [(t.documents, t.total_tokens) for t in await store_two.aggregate()] == [(1, 555)]
        assert await stored_metadata(backend, second, "doc-1") == {
            **other_metadata(), "token_usage": two.to_dict()
        }

    async def test_default_workspace(self, backend: Backend, unique: str) -> None:
        record = usage(run_id=unique)
        doc_id = f"default-doc-{unique}"
        await backend.seed("", {doc_id: doc_status(f"track-{unique}", record.to_dict())})
        store = await backend.store("")

        got = await store.get_usage(doc_id)
        assert got is not None and got.usage == record
        assert await store.write_usage(doc_id, usage(run_id=unique, revision=2))
        assert [d.doc_id for d in await store.usage_for_track(f"track-{unique}")] == [doc_id]
        assert (await store.aggregate(track_id=f"track-{unique}"))[0].documents == 1

    # -- hostile names ---------------------------------------------------------
    @pytest.mark.parametrize("name", [
        "O'Reilly \"quoted\" ws",
        "'; DROP TABLE LIGHTRAG_DOC_STATUS; --",
        "ws.with.dots",
        '{"$gt": ""}',
        "$where",
        "../escape",
        "a/b",
    ])
    async def test_hostile_workspace_is_literal_or_refused(
        self, backend: Backend, name: str, unique: str, workspace: str
    ) -> None:
        hostile = f"{name} {unique}"
        if backend.refuses(hostile):
            with pytest.raises(InvalidWorkspaceError):
                backend.standalone_store(hostile)
            return
        bystander = workspace
        await backend.seed(bystander, {"doc-1": doc_status("track", usage(run_id="b").to_dict())})
        record = usage(run_id="h")
        await backend.seed(hostile, {"doc-1": doc_status("track", record.to_dict())})
        store = await backend.store(hostile)

        got = await store.get_usage("doc-1")
        assert got is not None and got.usage == record and got.workspace == hostile
        assert await store.write_usage("doc-1", usage(2, 2, 2, run_id="h", revision=3))
        assert await store.merge_usage_delta("doc-1", {"llm_calls": 1})
        assert [(t.documents, t.llm_calls) for t in await store.aggregate()] == [(1, 3)]
        assert await store.workspace_exists()

        untouched = await (await backend.store(bystander)).get_usage("doc-1")
        assert untouched is not None and untouched.usage == usage(run_id="b")
        assert await backend.containers_exist([bystander, hostile])

    async def test_hostile_doc_and_track_ids_are_literal(
        self, backend: Backend, workspace: str
    ) -> None:
        hostile_ids = [
            "'; DROP TABLE LIGHTRAG_DOC_STATUS; --",
            '{"$gt": ""}',
            "$where",
            "a.b$c",
            "O'Reilly \"q\" %_\\",
            "doc-1' OR '1'='1",
        ]
        docs = {
            doc_id: doc_status(doc_id, usage(run_id=f"r{i}", llm_calls=i).to_dict())
            for i, doc_id in enumerate(hostile_ids, start=1)
        }
        docs["plain"] = doc_status("plain-track", usage(run_id="plain").to_dict())
        await backend.seed(workspace, docs)
        store = await backend.store(workspace)

        for i, doc_id in enumerate(hostile_ids, start=1):
            got = await store.get_usage(doc_id)
            assert got is not None and got.doc_id == doc_id
            assert got.usage is not None and got.usage.run_id == f"r{i}"
            # The doc id doubles as its track id: exactly one document per track.
            assert [d.doc_id for d in await store.usage_for_track(doc_id)] == [doc_id]
            totals = await store.aggregate(track_id=doc_id)
            assert [(t.documents, t.llm_calls) for t in totals] == [(1, i)]
            assert await store.write_usage(doc_id, usage(run_id=f"r{i}", llm_calls=i,
                                                         revision=2))
            assert await store.merge_usage_delta(doc_id, {"llm_calls": 10}, run_id=f"r{i}")

        by_track = {t.key: t.llm_calls for t in await store.aggregate(group_by="track_id")}
        assert by_track == {
            **{doc_id: i + 10 for i, doc_id in enumerate(hostile_ids, start=1)},
            "plain-track": 2,
        }
        plain = await store.get_usage("plain")
        assert plain is not None and plain.usage == usage(run_id="plain")
        assert await backend.containers_exist([workspace])

    async def test_hostile_model_names_are_literal(
        self, backend: Backend, workspace: str
    ) -> None:
        record = UsageRecord(
            llm_input_tokens=10, llm_output_tokens=1, llm_calls=1, embedding_tokens=0,
            models={"gpt-4.1": ModelUsage("llm", 10, 1, 1)}, run_id="r", revision=1,
            processing_end_time=DAY1,
        )
        await backend.seed(workspace, {"d": doc_status("t", record.to_dict())})
        store = await backend.store(workspace)

        assert await store.merge_usage_delta("d", {"models": {
            "gpt-4.1": {"input_tokens": 1, "calls": 1},
            "$gt": {"input_tokens": 2, "output_tokens": 1, "calls": 1},
            "'; DROP TABLE x; --": {"kind": "embedding", "input_tokens": 3, "calls": 1},
        }})
        rows = {r.key: (r.documents, r.llm_input_tokens, r.embedding_tokens, r.llm_calls)
                for r in await store.aggregate(group_by="model")}
        assert rows == {
            "gpt-4.1": (1, 11, 0, 2), "$gt": (1, 2, 0, 1), "'; DROP TABLE x; --": (1, 0, 3, 0),
        }
        got = await store.get_usage("d")
        assert got is not None and got.usage is not None
        assert got.usage.models["$gt"] == ModelUsage("llm", 2, 1, 1)

    # -- sharing LightRAG's connection -----------------------------------------
    async def test_store_from_rag_shares_lightrag_storage_and_leaves_it_open(
        self, backend: Backend, workspace: str
    ) -> None:
        record = usage()
        await backend.seed(workspace, {"doc-1": doc_status("t", record.to_dict())})
        store = await backend.store(workspace, via="rag")
        assert store.backend == backend.kind

        got = await store.get_usage("doc-1")
        assert got is not None and got.usage == record
        assert await store.write_usage("doc-1", usage(run_id="run-1", revision=2))
        assert await store.merge_usage_delta("doc-1", {"llm_cache_hits": 4})
        assert [t.llm_cache_hits for t in await store.aggregate()] == [4]
        assert await store.workspace_exists()
        await store.close()

        # LightRAG's own storage still works after the store is closed.
        metadata = await stored_metadata(backend, workspace, "doc-1")
        assert metadata["token_usage"]["llm_cache_hits"] == 4
        assert without_usage(metadata) == other_metadata()
