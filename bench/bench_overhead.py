"""How much does metering cost? Side-by-side runs in one process.

Runs LightRAG's real ingestion (JSON store) of the same documents with scripted models
that sleep like a fast provider, alternately without and with `tokmeter.instrument`,
and a micro-benchmark of one metered call against the bare function. Reports medians
and ratios (these machines are noisy: compare ratios, not seconds).

    .venv/bin/python bench/bench_overhead.py [--docs 24] [--rounds 5] [--latency 0.005]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tokmeter  # noqa: E402
from tests.scripted import ScriptedModels, document_text, marker  # noqa: E402

_RUNS = itertools.count()


async def ingest_once(docs: int, latency: float, instrumented: bool,
                      trace: bool = False) -> tuple[float, int]:
    from lightrag import LightRAG
    from lightrag.utils import EmbeddingFunc

    models = ScriptedModels(delay=latency)

    # plain functions: LightRAG deep-copies its config, and a bound method would drag
    # the models' lock along
    async def llm(*args: Any, **kwargs: Any) -> Any:
        return await models.llm(*args, **kwargs)

    async def embed(*args: Any, **kwargs: Any) -> Any:
        return await models.embed(*args, **kwargs)

    if instrumented:
        llm = tokmeter.metered("llm", model="bench-llm", encoding="o200k_base",
                               token_tracker=True)(llm)
        embed = tokmeter.metered("embedding", model="bench-emb", encoding="o200k_base",
                                 token_tracker=True)(embed)
    with tempfile.TemporaryDirectory() as workdir:
        rag = LightRAG(working_dir=workdir, workspace=f"bench{next(_RUNS)}", llm_model_func=llm,
                       embedding_func=EmbeddingFunc(embedding_dim=16, func=embed),
                       max_parallel_insert=4, chunk_token_size=120, chunk_overlap_token_size=10)
        if instrumented:
            tokmeter.instrument(rag)
        await rag.initialize_storages()
        texts = [document_text(i, 4 + (i * 7) % 13) for i in range(docs)]
        gc.collect()
        # tracemalloc slows allocation-heavy code: time and memory come from separate runs
        if trace:
            tracemalloc.start()
        started = time.perf_counter()
        await rag.ainsert(texts, ids=[marker(i) for i in range(docs)])
        elapsed = time.perf_counter() - started
        peak = 0
        if trace:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        counts = await rag.doc_status.get_status_counts()
        if counts.get("processed", 0) != docs:
            raise RuntimeError(f"benchmark ingestion did not process every document: {counts}")
        await rag.finalize_storages()
    return elapsed, peak


async def call_overhead(n: int) -> tuple[float, float]:
    async def bare(prompt: str, token_tracker: Any = None) -> str:
        if token_tracker is not None:
            token_tracker.add_usage({"prompt_tokens": 10, "completion_tokens": 2,
                                     "total_tokens": 12})
        return "ok"

    wrapped = tokmeter.metered("llm", model="bench")(bare)
    async with tokmeter.scope("bench"):
        for fn in (bare, wrapped):  # warm up
            await fn("x")
        t0 = time.perf_counter()
        for _ in range(n):
            await bare("x")
        t1 = time.perf_counter()
        for _ in range(n):
            await wrapped("x")
        t2 = time.perf_counter()
    return (t1 - t0) / n, (t2 - t1) / n


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.005,
                        help="seconds each scripted model call sleeps")
    args = parser.parse_args()
    import logging

    import lightrag.utils  # noqa: F401 - sets its logger up on import; quiet it after

    logging.getLogger("lightrag").setLevel(logging.ERROR)

    plain: list[tuple[float, int]] = []
    metered: list[tuple[float, int]] = []
    await ingest_once(4, args.latency, True)  # warm caches, self-test, tokenizer
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for instrumented in order:
            elapsed, _ = await ingest_once(args.docs, args.latency, instrumented)
            _, peak = await ingest_once(args.docs, args.latency, instrumented, trace=True)
            result = (elapsed, peak)
            (metered if instrumented else plain).append(result)
            print(f"round {r + 1}/{args.rounds} {'metered' if instrumented else 'plain  '}: "
                  f"{result[0]:.3f} s, peak {result[1] / 2**20:.1f} MiB", file=sys.stderr)
    t_plain = statistics.median(t for t, _ in plain)
    t_meter = statistics.median(t for t, _ in metered)
    m_plain = statistics.median(m for _, m in plain)
    m_meter = statistics.median(m for _, m in metered)
    bare, wrapped = await call_overhead(20000)
    print(f"ingest {args.docs} documents, {args.rounds} rounds each, model latency "
          f"{args.latency * 1000:.0f} ms")
    print(f"  wall time  plain {t_plain:.3f} s  metered {t_meter:.3f} s  "
          f"ratio {t_meter / t_plain:.3f}")
    print(f"  peak heap  plain {m_plain / 2**20:.1f} MiB  metered {m_meter / 2**20:.1f} MiB  "
          f"ratio {m_meter / m_plain:.3f}")
    print(f"one LLM call with provider usage: bare {bare * 1e6:.1f} us, metered "
          f"{wrapped * 1e6:.1f} us, overhead {(wrapped - bare) * 1e6:.1f} us per call")


if __name__ == "__main__":
    asyncio.run(main())
