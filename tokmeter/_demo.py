"""``tokmeter demo``: ingest bundled sample documents through a real LightRAG and show usage.

The default models are OFFLINE DEMO MODELS: a rule-based entity extractor and a
hashing embedder. They speak LightRAG's extraction format and report usage the way
a provider does (exact o200k_base counts of what they read and wrote), so the
numbers are real token counts of real prompts; only the answers are not an LLM's.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import attrs
import numpy as np

import tokmeter
from tokmeter._estimate import count_tokens

DEMO_LLM_MODEL = "tokmeter-demo-extractor"
DEMO_EMBEDDING_MODEL = "tokmeter-demo-hash-embedder"
DEMO_EMBEDDING_DIM = 64
FAILURE_MARKER = "[[demo: model failure]]"

_NAME = re.compile(r"\b[A-Z][a-z]{2,}(?:\s+[A-Z][a-z]{2,})*\b")
_INPUT_SECTION = re.compile(r"---Input Text---\s*(.*?)(?:\n---[A-Z][^\n]*---|\Z)", re.DOTALL)
_STOP = {"The", "This", "That", "Over", "Together", "Chapter", "Scanned", "Page", "Dr"}


class DemoModelFailure(RuntimeError):
    """Raised by the demo LLM for the sample document that is meant to fail."""


@tokmeter.metered("llm", model=DEMO_LLM_MODEL, encoding="o200k_base")
async def demo_llm(
    prompt: str,
    system_prompt: str | None = None,
    history_messages: list[dict[str, Any]] | None = None,
    token_tracker: Any = None,
    **kwargs: Any,
) -> str:
    """Offline demo LLM: pulls capitalised names out of the input text as entities."""
    if FAILURE_MARKER in prompt:
        raise DemoModelFailure("demo model failure (on purpose, for the failed-document example)")
    found = _INPUT_SECTION.search(prompt)
    text = found.group(1) if found else prompt
    names: list[str] = []
    for name in _NAME.findall(text):
        if name.split()[0] not in _STOP and name not in names:
            names.append(name)
    names = names[:8]
    rows = [f"entity<|#|>{n}<|#|>Other<|#|>{n} is mentioned in the source text." for n in names]
    rows += [
        f"relation<|#|>{a}<|#|>{b}<|#|>mentioned together<|#|>"
        f"{a} and {b} appear in the same passage."
        for a, b in zip(names, names[1:], strict=False)
    ]
    rows.append("<|COMPLETE|>")
    answer = "\n".join(rows)
    if token_tracker is not None:
        read = "\n".join(
            [prompt, system_prompt or ""]
            + [str(m.get("content", "")) for m in history_messages or []]
        )
        prompt_tokens = count_tokens(read)
        completion_tokens = count_tokens(answer)
        token_tracker.add_usage(
            {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
        )
    await asyncio.sleep(0)
    return answer


@tokmeter.metered("embedding", model=DEMO_EMBEDDING_MODEL, encoding="o200k_base")
async def demo_embed(texts: list[str], token_tracker: Any = None, **kwargs: Any) -> np.ndarray:
    """Offline demo embedder: a hashed bag of words, reported like a provider would."""
    vectors = np.zeros((len(texts), DEMO_EMBEDDING_DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            bucket = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big")
            vectors[row, bucket % DEMO_EMBEDDING_DIM] += 1.0
        norm = float(np.linalg.norm(vectors[row]))
        if norm:
            vectors[row] /= norm
    result: np.ndarray = vectors
    if token_tracker is not None:
        total = sum(count_tokens(t) for t in texts)
        token_tracker.add_usage({"prompt_tokens": total, "total_tokens": total})
    return result


@attrs.define(frozen=True)
class SampleDocument:
    doc_id: str
    file_path: str
    text: str


def sample_documents() -> list[SampleDocument]:
    """The bundled samples: several sizes, one empty, one that fails on purpose."""
    folder = importlib.resources.files("tokmeter.samples")
    docs = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".txt"):
            continue
        stem = entry.name[: -len(".txt")]
        docs.append(SampleDocument(f"demo-{stem}", entry.name, entry.read_text("utf-8")))
    return docs


@attrs.define(frozen=True)
class ModelChoice:
    """Which model functions the demo uses (offline demo models by default)."""

    llm: Callable[..., Any] = demo_llm
    embed: Callable[..., Any] = demo_embed
    embedding_dim: int = DEMO_EMBEDDING_DIM
    label: str = "OFFLINE DEMO MODELS (rule-based extractor + hashing embedder, no network)"


def openai_compatible_models(
    base_url: str, llm_model: str, embedding_model: str, embedding_dim: int, api_key: str | None
) -> ModelChoice:
    """Real models behind an OpenAI-compatible endpoint, through LightRAG's openai binding."""
    try:
        from lightrag.llm.openai import openai_complete_if_cache, openai_embed
    except ImportError as exc:  # pragma: no cover - depends on the user's install
        raise SystemExit(
            "the OpenAI-compatible demo needs the 'openai' package: pip install openai"
        ) from exc
    key = api_key or os.environ.get("OPENAI_API_KEY") or "not-needed"

    @tokmeter.metered("llm", model=llm_model)
    async def llm(
        prompt: str,
        system_prompt: str | None = None,
        history_messages: list[dict[str, Any]] | None = None,
        token_tracker: Any = None,
        **kwargs: Any,
    ) -> Any:
        kwargs.pop("hashing_kv", None)
        return await openai_complete_if_cache(
            llm_model,
            prompt,
            system_prompt=system_prompt,
            history_messages=history_messages,
            base_url=base_url,
            api_key=key,
            token_tracker=token_tracker,
            **kwargs,
        )

    @tokmeter.metered("embedding", model=embedding_model)
    async def embed(texts: list[str], token_tracker: Any = None, **kwargs: Any) -> np.ndarray:
        vectors: np.ndarray = await openai_embed.func(
            texts,
            model=embedding_model,
            base_url=base_url,
            api_key=key,
            token_tracker=token_tracker,
        )
        return vectors

    return ModelChoice(
        llm=llm,
        embed=embed,
        embedding_dim=embedding_dim,
        label=f"OpenAI-compatible endpoint {base_url} ({llm_model}, {embedding_model})",
    )


class ProgressBar:
    """A one-line progress bar on a terminal, plain lines elsewhere (CI logs)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self._last = -1

    def update(self, done: int, note: str = "") -> None:
        if done == self._last:
            return
        self._last = done
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"ingesting [{bar}] {done}/{self.total} documents {note}".rstrip()
        if self.tty:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


async def run_demo(
    workdir: Path,
    models: ModelChoice | None = None,
    *,
    progress: TextIO | None = sys.stderr,
    workspace: str = "demo",
) -> list[dict[str, Any]]:
    """Ingest the samples into a fresh LightRAG in ``workdir``; return one row per document."""
    from lightrag import LightRAG
    from lightrag.utils import EmbeddingFunc

    models = models or ModelChoice()
    docs = sample_documents()
    rag = LightRAG(
        working_dir=str(workdir),
        workspace=workspace,
        llm_model_func=models.llm,
        embedding_func=EmbeddingFunc(
            embedding_dim=models.embedding_dim, func=models.embed, max_token_size=8192
        ),
        max_parallel_insert=4,
        chunk_token_size=400,
        chunk_overlap_token_size=40,
    )
    instrumentation = tokmeter.instrument(rag)
    await rag.initialize_storages()
    try:
        bar = ProgressBar(len(docs), progress) if progress is not None else None
        insert = asyncio.ensure_future(
            rag.ainsert(
                [d.text for d in docs],
                ids=[d.doc_id for d in docs],
                file_paths=[d.file_path for d in docs],
            )
        )
        started = time.monotonic()
        while not insert.done():
            await asyncio.wait([insert], timeout=0.25)
            if bar is not None:
                bar.update(
                    await _finished_count(rag, [d.doc_id for d in docs]),
                    f"({time.monotonic() - started:.1f} s)",
                )
        track_id = insert.result()
        if bar is not None:
            bar.update(len(docs), f"({time.monotonic() - started:.1f} s)")
            bar.close()
        await instrumentation.flush()
        rows = []
        for doc in docs:
            status = await rag.doc_status.get_by_id(doc.doc_id) or {}
            metadata = status.get("metadata") or {}
            rows.append(
                {
                    "doc_id": doc.doc_id,
                    "file_path": doc.file_path,
                    "status": str(getattr(status.get("status"), "value", status.get("status"))),
                    "track_id": status.get("track_id", track_id),
                    "token_usage": metadata.get("token_usage"),
                }
            )
        return rows
    finally:
        await rag.finalize_storages()


async def _finished_count(rag: Any, doc_ids: list[str]) -> int:
    done = 0
    for doc_id in doc_ids:
        row = await rag.doc_status.get_by_id(doc_id)
        status = str(getattr((row or {}).get("status"), "value", (row or {}).get("status")))
        done += status in ("processed", "failed")
    return done


def format_table(rows: list[dict[str, Any]]) -> str:
    """The per-document table and totals printed by ``tokmeter demo``."""
    header = (
        "document",
        "status",
        "chunks",
        "llm in",
        "llm out",
        "embedding",
        "total",
        "estimated",
    )
    lines: list[tuple[str, ...]] = [header]
    totals = [0, 0, 0, 0, 0]
    for row in rows:
        u = row.get("token_usage") or {}
        figures = [
            u.get("total_chunks"),
            u.get("llm_input_tokens"),
            u.get("llm_output_tokens"),
            u.get("embedding_tokens"),
            u.get("total_tokens"),
        ]
        for i, value in enumerate(figures):
            totals[i] += value or 0
        lines.append(
            (
                row["file_path"],
                row["status"] + ("" if u.get("complete", True) else " (partial)"),
                *("-" if v is None else f"{v:,}" for v in figures),
                ("yes" if u.get("estimated") else "no") if u else "-",
            )
        )
    lines.append(("TOTAL", "", *(f"{v:,}" for v in totals), ""))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(line[2:7], widths[2:7], strict=True)]
        cells.append(line[7].ljust(widths[7]))
        out.append("  ".join(cells).rstrip())
        if n == 0 or n == len(lines) - 2:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
