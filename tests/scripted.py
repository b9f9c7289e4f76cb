"""Scripted model functions with known usage, for driving LightRAG's real pipeline.

Every document's text carries a unique marker (``DOC007``) in every sentence, and the
scripted extractor names its entities after the marker, so every LLM prompt and every
embedded text names exactly one document. The models log what they reported per
call; tests compare tokmeter's per-document figures against those logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections import defaultdict
from typing import Any

import numpy as np

from tokmeter._estimate import count_tokens

MARKER = re.compile(r"DOC(\d{3})")
EMBEDDING_DIM = 16


def marker(i: int) -> str:
    return f"DOC{i:03d}"


def document_text(i: int, sentences: int) -> str:
    """A document whose every sentence carries its marker (so every chunk does)."""
    m = marker(i)
    words = ["harbour", "ledger", "orchard", "turbine", "archive", "meadow", "signal", "quarry"]
    out = []
    for s in range(sentences):
        w = words[(i + s) % len(words)]
        # a marker every few tokens: any chunk LightRAG cuts (>= overlap) names it
        out.append(f"Record {m} part {s}. {m} {w} team. {m} {w} budget. {m} {w} plans.")
    return " ".join(out)


def markers_in(*texts: Any) -> set[str]:
    found: set[str] = set()
    for text in texts:
        if isinstance(text, str):
            found.update(f"DOC{m}" for m in MARKER.findall(text))
        elif isinstance(text, list):
            for item in text:
                if isinstance(item, dict):
                    found |= markers_in(item.get("content"))
    return found


class ScriptedModels:
    """An extraction LLM and an embedder that report provider-style usage.

    Options:
        report_usage: report usage through ``token_tracker`` (else: nothing, so tokmeter
            must estimate).
        fail_marker: raise on every LLM call for this document.
        flaky_first_attempt: the first LLM attempt for each prompt raises once.
        embedding_extra: tokens the "provider" adds to each embedding batch on top of the
            texts' own counts (tokmeter must still hand out the batch total exactly).
    """

    def __init__(
        self,
        *,
        report_usage: bool = True,
        fail_marker: str | None = None,
        flaky_first_attempt: bool = False,
        embedding_extra: int = 0,
        delay: float = 0.0,
    ) -> None:
        self.report_usage = report_usage
        self.fail_marker = fail_marker
        self.flaky_first_attempt = flaky_first_attempt
        self.embedding_extra = embedding_extra
        self.delay = delay
        self._lock = threading.Lock()
        self.llm_log: list[dict[str, Any]] = []
        self.embedding_batches: list[dict[str, Any]] = []
        self._seen_prompts: set[str] = set()

    # -- the model functions ----------------------------------------------------
    def answer_for(
        self, prompt: str, system_prompt: str | None, history: list[dict[str, Any]] | None
    ) -> str:
        docs = markers_in(prompt, system_prompt, history)
        m = sorted(docs)[0] if docs else "DOCXXX"
        names = [f"Unit {m} Alpha", f"Unit {m} Beta", f"Unit {m} Gamma"]
        rows = [
            f"entity<|#|>{n}<|#|>Organization<|#|>{n} is a team named in record {m}." for n in names
        ]
        rows += [
            f"relation<|#|>{a}<|#|>{b}<|#|>cooperation<|#|>{a} works with {b} in record {m}."
            for a, b in zip(names, names[1:], strict=False)
        ]
        rows.append("<|COMPLETE|>")
        return "\n".join(rows)

    def reported(self, prompt: str, system_prompt: str | None, answer: str) -> tuple[int, int]:
        """Deterministic provider figures, deliberately not equal to a tiktoken count."""
        return len(prompt) // 4 + len(system_prompt or "") // 5 + 7, len(answer) // 3 + 2

    def llm_sync(
        self,
        prompt: str,
        system_prompt: str | None = None,
        history_messages: list[dict[str, Any]] | None = None,
        token_tracker: Any = None,
        **kwargs: Any,
    ) -> str:
        docs = markers_in(prompt, system_prompt, history_messages)
        entry: dict[str, Any] = {
            "docs": docs,
            "failed": False,
            "reported": None,
            "prompt": prompt[:200],
            "history": str(history_messages)[:200],
        }
        try:
            if self.fail_marker and self.fail_marker in docs:
                raise RuntimeError(f"scripted failure for {self.fail_marker}")
            key = f"{prompt}|{system_prompt}|{len(history_messages or [])}"
            if self.flaky_first_attempt:
                with self._lock:
                    first = key not in self._seen_prompts
                    self._seen_prompts.add(key)
                if first:
                    raise ConnectionError("scripted transient failure (first attempt)")
            answer = self.answer_for(prompt, system_prompt, history_messages)
            inp, out = self.reported(prompt, system_prompt, answer)
            if self.report_usage and token_tracker is not None:
                token_tracker.add_usage(
                    {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out}
                )
                entry["reported"] = (inp, out)
            return answer
        except Exception:
            entry["failed"] = True
            raise
        finally:
            with self._lock:
                self.llm_log.append(entry)

    async def llm(
        self,
        prompt: str,
        system_prompt: str | None = None,
        history_messages: list[dict[str, Any]] | None = None,
        token_tracker: Any = None,
        **kwargs: Any,
    ) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        else:
            await asyncio.sleep(0)
        return self.llm_sync(prompt, system_prompt, history_messages, token_tracker)

    async def embed(self, texts: list[str], token_tracker: Any = None, **kwargs: Any) -> np.ndarray:
        await asyncio.sleep(self.delay or 0)
        counts = [count_tokens(t) for t in texts]
        total = sum(counts) + self.embedding_extra
        if self.report_usage and token_tracker is not None:
            token_tracker.add_usage({"prompt_tokens": total, "total_tokens": total})
        with self._lock:
            self.embedding_batches.append(
                {
                    "texts": [
                        (sorted(markers_in(t)), c) for t, c in zip(texts, counts, strict=True)
                    ],
                    "total": total,
                }
            )
        vectors = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        for row, text in enumerate(texts):
            digest = hashlib.sha256(text.encode()).digest()
            vectors[row] = np.frombuffer(digest[:EMBEDDING_DIM], dtype=np.uint8) / 255.0
        return vectors

    # -- ground truth -------------------------------------------------------------
    def llm_truth(self) -> dict[str, dict[str, int]]:
        """Per document: reported input/output tokens and attempts."""
        truth: dict[str, dict[str, int]] = defaultdict(
            lambda: {"in": 0, "out": 0, "calls": 0, "failed": 0}
        )
        for entry in self.llm_log:
            assert len(entry["docs"]) == 1, f"a prompt named {entry}"
            (doc,) = entry["docs"]
            t = truth[doc]
            t["calls"] += 1
            if entry["failed"]:
                t["failed"] += 1
            elif entry["reported"] is not None:
                t["in"] += entry["reported"][0]
                t["out"] += entry["reported"][1]
        return dict(truth)

    def embedding_truth(self) -> dict[str, int]:
        """Per document: tiktoken counts of its embedded texts (its share when extra=0)."""
        truth: dict[str, int] = defaultdict(int)
        for batch in self.embedding_batches:
            for docs, count in batch["texts"]:
                assert len(docs) == 1, f"an embedded text named {docs}"
                truth[docs[0]] += count
        return dict(truth)

    def embedding_total(self) -> int:
        return sum(b["total"] for b in self.embedding_batches)
