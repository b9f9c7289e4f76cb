"""Billing queries over many documents: in-database aggregation against fetching every row.

Seeds N documents (default 100,000) in LightRAG 1.5.7's doc-status layout into a fresh,
uniquely named workspace of PostgreSQL (table ``LIGHTRAG_DOC_STATUS``) and MongoDB
(collection ``{workspace}_doc_status``), with bulk inserts (asyncpg COPY, pymongo
``insert_many``), and a smaller JSON store through LightRAG's own
``JsonDocStatusStorage.upsert``. The table / collection / file is first created by
LightRAG's own storage class, and sample rows are read back through LightRAG's
``get_by_id`` / ``get_docs_by_track_id`` and through tokmeter's ``get_usage``.

Then, side by side in one run (alternating which goes first), it times
``UsageStore.aggregate()`` (one query that sums on the server) against the naive way:
fetch every row's metadata to Python and sum there, with tokmeter's own Python
aggregation (what the JSON store does). The naive fetch does not depend on the query,
so each repeat fetches once and counts that time in every query's naive figure. Every
result of both ways is asserted equal to the totals computed from the generated records.
Progress goes to stderr; a markdown report to stdout. The seeded rows, collection and
files are removed at the end, also after an error, Ctrl-C or SIGTERM.

Needs the test servers (``scripts/services.sh start``; ``source .services/env.sh``):
TOKMETER_TEST_POSTGRES_DSN, TOKMETER_TEST_MONGO_URI and MONGO_DATABASE.

    .venv/bin/python bench/bench_aggregate.py [--docs 100000] [--json-docs 20000]
        [--repeats 5] [--mongo-repeats 2] [--backends postgres,mongo,json] [--seed 7]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from tokmeter.backends import (
    JsonUsageStore,
    MongoUsageStore,
    PostgresUsageStore,
    UsageStore,
    UsageTotals,
)
from tokmeter.backends._base import aggregate_records, usage_from_metadata

from tokmeter._record import ModelUsage, UsageRecord

UTC = dt.timezone.utc

#: processing_end_time of the seeded documents spans 30 days from here.
START = int(dt.datetime(2025, 5, 1, tzinfo=UTC).timestamp())
DAYS = 30
UPLOADS = 200

LLM_MODEL = "gpt-4o-mini"
BIG_LLM_MODEL = "gpt-4.1"  # a dot in a model name, as real ones have
EMBEDDING_MODEL = "text-embedding-3-small"

#: Columns PGDocStatusStorage.upsert writes, in its order.
PG_COLUMNS = (
    "workspace", "id", "content_summary", "content_length", "chunks_count", "status",
    "file_path", "chunks_list", "track_id", "metadata", "error_msg", "content_hash",
    "created_at", "updated_at",
)

_SENTENCES = (
    "The quarterly report of the harbour authority lists revenue by terminal and region.",
    "Minutes of the board meeting: budget review, the turbine contract and staffing plans.",
    "Invoice batch for the orchard cooperative, with delivery notes and payment terms.",
    "Technical manual, chapter 4: calibrating the signal relay and replacing its fuses.",
    "Interview transcript with the archive's curator about the digitisation programme.",
    "Survey of meadow restoration sites with soil samples and species counts per plot.",
    "Policy draft on data retention for customer support tickets and call recordings.",
)


def log(message: str) -> None:
    print(f"bench_aggregate: {message}", file=sys.stderr, flush=True)


def iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, UTC).isoformat()


# -- the documents ------------------------------------------------------------------------


def make_documents(n: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """``n`` doc-status rows as LightRAG's pipeline (instrumented by tokmeter) writes them:
    the payload ``doc_status.upsert`` receives, keyed by doc id.

    Processing ends spread over 30 days; 200 uploads (track ids), each a contiguous run
    of documents; three models (two LLMs, one embedder); about 2% failed (incomplete
    usage), 4% estimated, 0.3% with an unknown (null) output count, and 1% without any
    token_usage (still pending, or processed before metering was switched on).
    """
    rng = random.Random(seed)
    ends = sorted(START + rng.randrange(DAYS * 86400) for _ in range(n))
    uploads = min(UPLOADS, n)
    cuts = [0, *sorted(rng.sample(range(1, n), uploads - 1)), n] if uploads > 1 else [0, n]
    docs: list[tuple[str, dict[str, Any]]] = []
    for u in range(uploads):
        first, last = cuts[u], cuts[u + 1]
        uploaded = ends[first] - rng.randrange(60, 3600)
        stamp = dt.datetime.fromtimestamp(uploaded, UTC).strftime("%Y%m%d_%H%M%S")
        track_id = f"insert_{stamp}_{rng.getrandbits(32):08x}"
        for i in range(first, last):
            docs.append(_document(rng, i, ends[i], uploaded, track_id))
    return docs


def _document(
    rng: random.Random, i: int, end: int, uploaded: int, track_id: str
) -> tuple[str, dict[str, Any]]:
    doc_id = f"doc-{rng.getrandbits(128):032x}"
    chunks = max(1, min(80, int(rng.lognormvariate(1.8, 0.8))))
    text = " ".join(rng.choice(_SENTENCES) for _ in range(4))
    row: dict[str, Any] = {
        "content_summary": text[:250] + "..." if len(text) > 250 else text,
        "content_length": chunks * rng.randint(3800, 5200),
        "created_at": iso(uploaded),
        "file_path": f"{rng.choice(('report', 'invoice', 'manual', 'minutes'))}-{i:06d}.pdf",
        "track_id": track_id,
        "content_hash": f"{rng.getrandbits(128):032x}",
    }
    kind = rng.random()
    if kind < 0.005:  # still waiting to be processed: no usage yet
        # chunks_list: every backend's upsert adds it (PostgreSQL writes chunks_count -1)
        row.update(status="pending", updated_at=iso(uploaded), chunks_list=[], metadata={})
        return doc_id, row
    failed = kind < 0.025
    started = end - int(5 + chunks * rng.uniform(2.0, 8.0))
    metadata: dict[str, Any] = {
        "parse_start_time": started - 1,
        "parse_stage_skipped": True,
        "parse_format": "raw",
        "parse_engine": "legacy",
        "analyzing_start_time": started - 1,
        "analyzing_stage_skipped": True,
        "kg_write_state": "pre_graph" if failed else "graph_mutation_started",
        "process_start_time": started,
        "process_end_time": end,
        "chunk_method": "legacy_chunking_func",
        "chunk_opts": "size=1200, split_only=False, overlap=100",
    }
    row.update(
        status="failed" if failed else "processed",
        updated_at=iso(end),
        chunks_count=chunks,
        chunks_list=[f"chunk-{rng.getrandbits(128):032x}" for _ in range(chunks)],
    )
    if failed:
        row["error_msg"] = f"C[{rng.randint(1, chunks)}/{chunks}]: RateLimitError: 429 Too Many"
    if 0.025 <= kind < 0.03:  # processed before tokmeter was installed
        row["metadata"] = metadata
        return doc_id, row
    record = _usage(rng, chunks, failed, row.get("error_msg"), started, end)
    metadata["token_usage"] = record.to_dict()
    metadata["processing_start_time"] = started
    metadata["processing_end_time"] = end
    row["metadata"] = metadata
    return doc_id, row


def _usage(
    rng: random.Random, chunks: int, failed: bool, error: str | None, started: int, end: int
) -> UsageRecord:
    pick = rng.random()
    llms = [LLM_MODEL] if pick < 0.85 else [BIG_LLM_MODEL] if pick < 0.97 else [
        LLM_MODEL, BIG_LLM_MODEL]  # a few fell back to the other model
    done = rng.randint(1, chunks) if failed else chunks
    calls = done * 2 + rng.randrange(0, done // 2 + 2)  # extraction, gleaning, summaries
    unknown_output = rng.random() < 0.003  # a provider that reported no output usage
    models: dict[str, ModelUsage] = {}
    left = calls
    for n, name in enumerate(llms):
        share = left if n == len(llms) - 1 else max(1, left // 2)
        left -= share
        out: int | None = None if unknown_output else share * rng.randint(150, 650)
        models[name] = ModelUsage(kind="llm", input_tokens=share * rng.randint(1800, 3200),
                                  output_tokens=out, calls=share)
    emb_calls = 1 + math.ceil(done / 4) + rng.randrange(0, 3)
    models[EMBEDDING_MODEL] = ModelUsage(kind="embedding", output_tokens=0, calls=emb_calls,
                                         input_tokens=done * rng.randint(1100, 1700))
    llm_in = sum(m.input_tokens or 0 for m in models.values() if m.kind == "llm")
    llm_out = None if unknown_output else sum(
        m.output_tokens or 0 for m in models.values() if m.kind == "llm")
    main = max(llms, key=lambda name: models[name].tokens or 0)
    return UsageRecord(
        llm_input_tokens=llm_in,
        llm_output_tokens=llm_out,
        llm_calls=calls,
        llm_cache_hits=rng.randrange(1, calls + 1) if rng.random() < 0.08 else 0,
        embedding_tokens=models[EMBEDDING_MODEL].input_tokens,
        embedding_calls=emb_calls,
        total_chunks=chunks,
        llm_model=main,
        embedding_model=EMBEDDING_MODEL,
        models=models,
        estimated=rng.random() < 0.04,
        complete=not failed,
        faults=(f"document failed: {error}",) if failed else (),
        processing_start_time=started,
        processing_end_time=end,
        run_id=f"{rng.getrandbits(128):032x}",
        revision=calls + emb_calls + 2,
    )


# -- summing in Python (the naive way, and the expected figures) ----------------------------


def python_totals(
    rows: Iterable[tuple[str | None, Any]],
    *,
    since: int | None = None,
    until: int | None = None,
    group_by: str | None = None,
    track_id: str | None = None,
) -> list[UsageTotals]:
    """Totals of ``(track_id, metadata)`` rows, summed in Python with the same rules as
    ``UsageStore.aggregate`` (this is what the JSON store does)."""
    parsed = ((row_track, usage_from_metadata(metadata)) for row_track, metadata in rows)
    return group_parsed(parsed, since=since, until=until, group_by=group_by, track_id=track_id)


# The reference the stores' results are checked against: the rules of UsageStore.aggregate
# in Python (what the JSON store runs).
group_parsed = aggregate_records


def check(backend: str, query: str, got: list[UsageTotals], expected: list[UsageTotals]) -> None:
    if got != expected:
        diff = [(g, e) for g, e in zip(got, expected, strict=False) if g != e][:3]
        raise AssertionError(
            f"{backend} {query}: {len(got)} rows, expected {len(expected)}; first differences "
            f"(got, expected): {diff}"
        )


# -- timing ---------------------------------------------------------------------------------


class Query:
    def __init__(self, name: str, **kwargs: Any) -> None:
        self.name = name
        self.kwargs = kwargs


def queries(docs: Sequence[tuple[str, dict[str, Any]]]) -> list[Query]:
    week = START + (DAYS - 7) * 86400
    tracks = Counter(row["track_id"] for _, row in docs)
    # the upload nearest the median size
    one = sorted(tracks, key=lambda t: (tracks[t], t))[len(tracks) // 2]
    return [
        Query("total (`group_by=None`)"),
        Query('by model (`group_by="model"`)', group_by="model"),
        Query('by day (`group_by="day"`)', group_by="day"),
        Query('by upload (`group_by="track_id"`)', group_by="track_id"),
        Query("last 7 days (`since`/`until`)", since=week, until=START + DAYS * 86400),
        Query(f"one upload (`track_id=`, {tracks[one]} docs)", track_id=one),
    ]


def expected_totals(docs: Sequence[tuple[str, dict[str, Any]]],
                    qs: Sequence[Query]) -> dict[str, list[UsageTotals]]:
    """Each query's totals, computed from the generated records themselves."""
    parsed = [(row["track_id"], usage_from_metadata(row["metadata"])) for _, row in docs]
    return {q.name: group_parsed(parsed, **q.kwargs) for q in qs}


Rows = list[tuple[Any, Any]]


async def compare(
    backend: str,
    store: UsageStore,
    fetch: Callable[[], Awaitable[Rows]],
    qs: list[Query],
    expected: dict[str, list[UsageTotals]],
    repeats: int,
) -> list[dict[str, Any]]:
    """Median seconds of ``store.aggregate`` and of the naive way, per query.

    The naive way is ``fetch()`` (every row's ``(track_id, metadata)`` to Python, parsed)
    then :func:`python_totals`. The fetch does not depend on the query, so each repeat
    fetches once and charges that time to every query's naive figure (fetch + its sum).
    Repeats alternate which way runs first. Every result is checked.
    """
    db: dict[str, list[float]] = {q.name: [] for q in qs}
    naive: dict[str, list[float]] = {q.name: [] for q in qs}
    summing: dict[str, list[float]] = {q.name: [] for q in qs}
    fetches: list[float] = []

    async def in_database() -> None:
        for q in qs:
            started = time.perf_counter()
            result = await store.aggregate(**q.kwargs)
            db[q.name].append(time.perf_counter() - started)
            check(backend, q.name, result, expected[q.name])

    async def in_python() -> None:
        started = time.perf_counter()
        rows = await fetch()
        fetched = time.perf_counter() - started
        fetches.append(fetched)
        for q in qs:
            started = time.perf_counter()
            result = python_totals(rows, **q.kwargs)
            summed = time.perf_counter() - started
            summing[q.name].append(summed)
            naive[q.name].append(fetched + summed)
            check(backend, f"{q.name} (naive)", result, expected[q.name])

    for rep in range(repeats):
        ways = [in_database, in_python] if rep % 2 == 0 else [in_python, in_database]
        for way in ways:
            await way()
        log(f"{backend}: repeat {rep + 1}/{repeats}: aggregate() {len(qs)} queries "
            f"{sum(db[q.name][-1] for q in qs):.1f} s; naive fetch {fetches[-1]:.1f} s + "
            f"sums {sum(summing[q.name][-1] for q in qs):.1f} s; all results check out")
    return [
        {
            "backend": backend,
            "query": q.name,
            "rows": len(expected[q.name]),
            "db": statistics.median(db[q.name]),
            "naive": statistics.median(naive[q.name]),
            "sum": statistics.median(summing[q.name]),
            "fetch": statistics.median(fetches),
            "db_all": db[q.name],
            "naive_all": naive[q.name],
        }
        for q in qs
    ]


# -- rows LightRAG reads back ---------------------------------------------------------------


def _same_time(a: Any, b: Any) -> bool:
    return a is not None and b is not None and (
        dt.datetime.fromisoformat(str(a)) == dt.datetime.fromisoformat(str(b)))


def check_lightrag_row(backend: str, doc_id: str, got: dict[str, Any] | None,
                       row: dict[str, Any]) -> None:
    if got is None:
        raise AssertionError(f"{backend}: LightRAG's get_by_id({doc_id!r}) found nothing")
    for key, value in row.items():
        stored = got.get(key)
        if key in ("created_at", "updated_at"):
            ok = _same_time(stored, value)
        else:
            ok = (getattr(stored, "value", stored) == value)
        if not ok:
            raise AssertionError(f"{backend}: LightRAG reads {doc_id} {key}={stored!r}, "
                                 f"seeded {value!r}")


async def check_samples(backend: str, storage: Any, store: UsageStore,
                        docs: Sequence[tuple[str, dict[str, Any]]],
                        exact_keys: bool = False) -> None:
    """Sample rows read back through LightRAG's get_by_id / get_docs_by_track_id and
    through the usage store's get_usage."""
    samples: dict[str, tuple[str, dict[str, Any]]] = {}
    for doc_id, row in docs:
        tu = row["metadata"].get("token_usage")
        kind = ("pending" if row["status"] == "pending" else "failed" if row["status"] ==
                "failed" else "unmetered" if tu is None else "unknown-output" if
                tu["llm_output_tokens"] is None else "estimated" if tu["estimated"] else
                "two-llms" if len(tu["models"]) == 3 else "processed")
        samples.setdefault(kind, (doc_id, row))
    for kind, (doc_id, row) in sorted(samples.items()):
        got = await storage.get_by_id(doc_id)
        check_lightrag_row(backend, doc_id, got, row)
        if exact_keys and set(got) != {*row, "_id"}:
            raise AssertionError(f"{backend}: {doc_id} has keys {sorted(got)}")
        usage = await store.get_usage(doc_id)
        assert usage is not None, f"{backend}: get_usage({doc_id!r}) found nothing"
        tu = row["metadata"].get("token_usage")
        want = UsageRecord.from_dict(tu) if tu is not None else None
        assert usage.usage == want, f"{backend} {kind}: get_usage {usage.usage} != {want}"
        assert (usage.status, usage.track_id, usage.file_path) == (
            row["status"], row["track_id"], row["file_path"]), f"{backend}: {usage}"
    track = docs[len(docs) // 2][1]["track_id"]
    in_track = sum(1 for _, row in docs if row["track_id"] == track)
    parsed = await storage.get_docs_by_track_id(track)
    assert len(parsed) == in_track, (
        f"{backend}: LightRAG parsed {len(parsed)} of the {in_track} documents of {track}")
    log(f"{backend}: LightRAG's get_by_id and tokmeter's get_usage read back "
        f"{len(samples)} sample rows ({', '.join(sorted(samples))}); LightRAG's "
        f"get_docs_by_track_id parsed all {in_track} documents of one upload")


# -- PostgreSQL -----------------------------------------------------------------------------


def lightrag_postgres_env(dsn: str) -> None:
    """Point LightRAG's PostgreSQL storage at ``dsn`` (as tests/backends/conftest.py does)."""
    parts = urlsplit(dsn)
    os.environ["POSTGRES_HOST"] = parts.hostname or "127.0.0.1"
    os.environ["POSTGRES_PORT"] = str(parts.port or 5432)
    os.environ["POSTGRES_USER"] = unquote(parts.username or "postgres")
    os.environ["POSTGRES_PASSWORD"] = unquote(parts.password or "unused")
    os.environ["POSTGRES_DATABASE"] = parts.path.lstrip("/") or "postgres"
    os.environ.pop("POSTGRES_WORKSPACE", None)  # would override the workspace


def pg_record(workspace: str, doc_id: str, row: dict[str, Any]) -> tuple[Any, ...]:
    """The tuple PGDocStatusStorage.upsert binds for ``row`` (same conversions)."""
    from lightrag.kg.postgres_impl import _parse_doc_status_datetime

    return (
        workspace, doc_id, row["content_summary"], row["content_length"],
        row.get("chunks_count", -1), row["status"], row["file_path"],
        json.dumps(row.get("chunks_list", [])), row.get("track_id"),
        json.dumps(row.get("metadata", {})), row.get("error_msg"), row.get("content_hash"),
        _parse_doc_status_datetime(row.get("created_at")),
        _parse_doc_status_datetime(row.get("updated_at")),
    )


async def bench_postgres(dsn: str, docs: Sequence[tuple[str, dict[str, Any]]],
                         expected: dict[str, list[UsageTotals]], qs: list[Query],
                         repeats: int, workspace: str, info: dict[str, Any]
                         ) -> list[dict[str, Any]]:
    import asyncpg
    from lightrag.kg.postgres_impl import PGDocStatusStorage

    lightrag_postgres_env(dsn)
    storage = PGDocStatusStorage(namespace="doc_status", workspace=workspace,
                                 global_config={}, embedding_func=None)
    conn = await asyncpg.connect(dsn, timeout=10)
    store = PostgresUsageStore(dsn, workspace)
    try:
        await storage.initialize()  # LightRAG creates its tables and indexes if missing
        info["postgres"] = (await conn.fetchval("SHOW server_version")).split()[0]
        started = time.perf_counter()
        batch = 10_000
        for first in range(0, len(docs), batch):
            await conn.copy_records_to_table(
                "lightrag_doc_status", columns=PG_COLUMNS,
                records=[pg_record(workspace, k, v) for k, v in docs[first:first + batch]],
            )
            log(f"postgres: seeded {min(first + batch, len(docs)):,}/{len(docs):,}")
        await conn.execute("ANALYZE lightrag_doc_status")
        info["postgres_seed"] = time.perf_counter() - started
        count = await conn.fetchval(
            "SELECT count(*) FROM LIGHTRAG_DOC_STATUS WHERE workspace = $1", workspace)
        assert count == len(docs), f"postgres: {count} rows seeded, not {len(docs)}"
        info["postgres_row_bytes"] = await conn.fetchval(
            "SELECT avg(pg_column_size(t.*))::int FROM LIGHTRAG_DOC_STATUS t "
            "WHERE workspace = $1", workspace)
        info["postgres_table_rows"] = await conn.fetchval(
            "SELECT reltuples::bigint FROM pg_class WHERE relname = 'lightrag_doc_status'")
        log(f"postgres: {count:,} rows in {info['postgres_seed']:.1f} s "
            f"(average row {info['postgres_row_bytes']} bytes)")
        await store.open()
        await check_samples("postgres", storage, store, docs)

        async def fetch() -> Rows:
            rows = await conn.fetch(
                "SELECT track_id, metadata FROM LIGHTRAG_DOC_STATUS WHERE workspace = $1",
                workspace)
            return [(r["track_id"], json.loads(r["metadata"])) for r in rows]

        return await compare("postgres", store, fetch, qs, expected, repeats)
    finally:
        with contextlib.suppress(Exception):
            await store.close()
        try:
            deleted = await conn.execute(
                "DELETE FROM LIGHTRAG_DOC_STATUS WHERE workspace = $1", workspace)
            log(f"postgres: cleaned up workspace {workspace!r} ({deleted})")
        finally:
            await conn.close()
            await storage.finalize()


# -- MongoDB --------------------------------------------------------------------------------


async def bench_mongo(uri: str, database: str, docs: Sequence[tuple[str, dict[str, Any]]],
                      expected: dict[str, list[UsageTotals]], qs: list[Query], repeats: int,
                      workspace: str, info: dict[str, Any]) -> list[dict[str, Any]]:
    from lightrag.kg.mongo_impl import MongoDocStatusStorage
    from pymongo import AsyncMongoClient

    os.environ["MONGO_URI"] = uri
    os.environ["MONGO_DATABASE"] = database
    os.environ.pop("MONGODB_WORKSPACE", None)  # would override the workspace
    storage = MongoDocStatusStorage(namespace="doc_status", workspace=workspace,
                                    global_config={}, embedding_func=None)
    client: Any = AsyncMongoClient(uri, serverSelectionTimeoutMS=10_000)
    name = f"{workspace}_doc_status"
    collection = client[database][name]
    store = MongoUsageStore(uri, workspace, database=database)
    try:
        build = await client[database].command("buildInfo")
        info["mongo"] = build.get("version", "?")
        await storage.initialize()  # LightRAG creates the collection and its indexes
        info["mongo_indexes"] = len(await (await collection.list_indexes()).to_list(None))
        started = time.perf_counter()
        batch = 5_000
        for first in range(0, len(docs), batch):
            await collection.insert_many(
                [{"_id": k, **v} for k, v in docs[first:first + batch]], ordered=False)
            log(f"mongo: seeded {min(first + batch, len(docs)):,}/{len(docs):,}")
        info["mongo_seed"] = time.perf_counter() - started
        count = await collection.count_documents({})
        assert count == len(docs), f"mongo: {count} documents seeded, not {len(docs)}"
        log(f"mongo: {count:,} documents in {info['mongo_seed']:.1f} s "
            f"({info['mongo_indexes']} indexes, LightRAG's)")
        await store.open()
        await check_samples("mongo", storage, store, docs, exact_keys=True)

        async def fetch() -> Rows:
            cursor = collection.find({}, {"_id": 0, "track_id": 1, "metadata": 1},
                                     batch_size=10_000)
            return [(r.get("track_id"), r.get("metadata")) for r in await cursor.to_list(None)]

        return await compare("mongo", store, fetch, qs, expected, repeats)
    finally:
        with contextlib.suppress(Exception):
            await store.close()
        try:
            await client[database].drop_collection(name)
            log(f"mongo: dropped collection {name!r}")
        finally:
            await client.close()
            await storage.finalize()


# -- JSON -----------------------------------------------------------------------------------


async def bench_json(docs: Sequence[tuple[str, dict[str, Any]]],
                     expected: dict[str, list[UsageTotals]], qs: list[Query], repeats: int,
                     workspace: str, info: dict[str, Any]) -> list[dict[str, Any]]:
    from lightrag.kg.json_doc_status_impl import JsonDocStatusStorage

    with tempfile.TemporaryDirectory(prefix="tokmeter-bench-") as workdir:
        storage = JsonDocStatusStorage(namespace="doc_status", workspace=workspace,
                                       global_config={"working_dir": workdir},
                                       embedding_func=None)
        store = JsonUsageStore(workdir, workspace)
        try:
            await storage.initialize()
            started = time.perf_counter()
            batch = 2_000
            for first in range(0, len(docs), batch):
                # upsert adds keys to the dicts it is given: hand it copies
                await storage.upsert({k: dict(v) for k, v in docs[first:first + batch]})
                log(f"json: seeded {min(first + batch, len(docs)):,}/{len(docs):,}")
            info["json_seed"] = time.perf_counter() - started
            info["json_bytes"] = store.file.stat().st_size
            await store.open()
            await check_samples("json", storage, store, docs)

            async def fetch() -> Rows:
                data = json.loads(store.file.read_bytes())
                return [(row.get("track_id"), row.get("metadata")) for row in data.values()]

            return await compare("json", store, fetch, qs, expected, repeats)
        finally:
            with contextlib.suppress(Exception):
                await store.close()
            await storage.finalize()
            log(f"json: removed {workdir}")


# -- report ---------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def report(results: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace,
           command: str) -> str:
    servers = ", ".join(part for part in (
        f"PostgreSQL {info['postgres']}" if "postgres" in info else "",
        f"MongoDB-wire test server (buildInfo version {info['mongo']})" if "mongo" in info
        else "",
    ) if part)
    repeats = f"{args.repeats} runs"
    if "mongo" in info and args.mongo_repeats != args.repeats:
        repeats += f" ({args.mongo_repeats} on MongoDB)"
    lines = [
        f"Command: `{command}`",
        "",
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
        + (f", {servers}" if servers else "") + f". Medians of {repeats}, in milliseconds.",
        "",
        "| Store | Documents | Query | Result rows | `aggregate()` | naive (fetch + sum) "
        "| of which sum | naive / `aggregate()` |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        n = args.json_docs if r["backend"] == "json" else args.docs
        lines.append(
            f"| {r['backend']} | {n:,} | {r['query']} | {r['rows']} | {ms(r['db'])} | "
            f"{ms(r['naive'])} | {ms(r['sum'])} | {r['naive'] / r['db']:.1f}x |"
        )
    fetches = {}
    for r in results:
        fetches.setdefault(r["backend"], r["fetch"])
    notes = [f"{backend} {ms(seconds)} ms" for backend, seconds in fetches.items()]
    if notes:
        lines += ["", "Naive fetch (every row's track_id and metadata into Python, parsed), "
                  "median: " + "; ".join(notes) + "."]
    seeds = []
    if "postgres_seed" in info:
        seeds.append(f"PostgreSQL {args.docs:,} rows by COPY in {info['postgres_seed']:.1f} s "
                     f"(average row {info['postgres_row_bytes']:,} bytes)")
    if "mongo_seed" in info:
        seeds.append(f"MongoDB {args.docs:,} documents by insert_many in "
                     f"{info['mongo_seed']:.1f} s ({info['mongo_indexes']} indexes)")
    if "json_seed" in info:
        seeds.append(f"JSON {args.json_docs:,} documents by JsonDocStatusStorage.upsert in "
                     f"batches of 2,000 in {info['json_seed']:.1f} s "
                     f"(file {info['json_bytes'] / 1e6:.0f} MB)")
    if seeds:
        lines += ["", "Seeding: " + "; ".join(seeds) + "."]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from lightrag.kg.shared_storage import initialize_share_data

    task = asyncio.current_task()
    if task is not None:  # SIGTERM cleans up like Ctrl-C does
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    initialize_share_data()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    workspace = f"bench_agg_{uuid.uuid4().hex[:10]}"
    log(f"workspace {workspace!r}; backends {', '.join(backends)}")
    info: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    servers = [b for b in backends if b != "json"]
    if servers:
        started = time.perf_counter()
        docs = make_documents(args.docs, args.seed)
        qs = queries(docs)
        expected = expected_totals(docs, qs)
        log(f"generated {len(docs):,} documents in {time.perf_counter() - started:.1f} s: "
            f"{dict(Counter(row['status'] for _, row in docs))}")
        if "postgres" in servers:
            dsn = os.environ.get("TOKMETER_TEST_POSTGRES_DSN")
            if not dsn:
                raise SystemExit("TOKMETER_TEST_POSTGRES_DSN is not set: "
                                 "source .services/env.sh")
            results += await bench_postgres(dsn, docs, expected, qs, args.repeats, workspace,
                                            info)
        if "mongo" in servers:
            uri = os.environ.get("TOKMETER_TEST_MONGO_URI")
            if not uri:
                raise SystemExit("TOKMETER_TEST_MONGO_URI is not set: source .services/env.sh")
            database = os.environ.get("MONGO_DATABASE") or "tokmeter_test"
            results += await bench_mongo(uri, database, docs, expected, qs,
                                         args.mongo_repeats, workspace, info)
        del docs
    if "json" in backends:
        docs = make_documents(args.json_docs, args.seed)
        qs = queries(docs)
        expected = expected_totals(docs, qs)
        results += await bench_json(docs, expected, qs, args.repeats, workspace, info)
    print(report(results, info, args, " ".join(["bench/bench_aggregate.py", *sys.argv[1:]])))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=100_000,
                        help="documents seeded in PostgreSQL and MongoDB (default 100000)")
    parser.add_argument("--json-docs", type=int, default=20_000,
                        help="documents seeded in the JSON store (default 20000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per query (default 5)")
    parser.add_argument("--mongo-repeats", type=int, default=2,
                        help="timed runs per query on MongoDB (default 2: the test server, "
                        "a MongoDB-wire server written in Python, takes 10-40 s per "
                        "full-collection query at 100,000 documents)")
    parser.add_argument("--backends", default="postgres,mongo,json",
                        help="comma-separated subset of postgres,mongo,json")
    parser.add_argument("--seed", type=int, default=7, help="random seed of the documents")
    args = parser.parse_args(argv)
    if args.docs < 2 or args.json_docs < 2 or min(args.repeats, args.mongo_repeats) < 1:
        parser.error("--docs and --json-docs must be at least 2, the repeats at least 1")
    unknown = set(args.backends.split(",")) - {"postgres", "mongo", "json"}
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    import lightrag.utils  # noqa: F401 - sets LightRAG's logger to INFO on import

    logging.getLogger("lightrag").setLevel(logging.WARNING)  # keep its warnings and errors
    started = time.perf_counter()
    try:
        asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted (the seeded data was removed)")
        return 130
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
