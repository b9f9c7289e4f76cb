"""The token_usage record (the contract stored in doc-status metadata) and its accumulator."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs

#: Version of the ``token_usage`` record layout. Bump on a breaking change.
SCHEMA_VERSION = 1

Kind = Literal["llm", "embedding"]
ScopeKind = Literal["document", "custom", "query", "unattributed"]


# Observers see every addition to any scope (used by tokmeter.testing.capture_usage).
UsageObserver = Callable[["UsageScope", str, str, "int | None", "int | None", bool], None]
_observers: list[UsageObserver] = []
_observers_lock = threading.Lock()


def add_observer(observer: UsageObserver) -> None:
    with _observers_lock:
        _observers.append(observer)


def remove_observer(observer: UsageObserver) -> None:
    with _observers_lock:
        if observer in _observers:
            _observers.remove(observer)


def _tell_observers(
    scope: UsageScope, kind: str, model: str, inp: int | None, out: int | None, estimated: bool
) -> None:
    for observer in _observers:
        try:
            observer(scope, kind, model, inp, out, estimated)
        except Exception:  # an observer must never break metering
            pass


def _add(a: int | None, b: int | None) -> int | None:
    """Sum two counts where ``None`` means unknown: unknown stays unknown."""
    if a is None or b is None:
        return None
    return a + b


@attrs.define(frozen=True)
class ModelUsage:
    """Usage of one model inside a record."""

    kind: Kind
    input_tokens: int | None = 0
    output_tokens: int | None = 0
    calls: int = 0

    @property
    def tokens(self) -> int | None:
        """Input plus output tokens (``None`` if either is unknown)."""
        return _add(self.input_tokens, self.output_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "tokens": self.tokens,
            "calls": self.calls,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelUsage:
        kind = data.get("kind", "llm")
        return cls(
            kind="embedding" if kind == "embedding" else "llm",
            input_tokens=_int_or_none(data.get("input_tokens")),
            output_tokens=_int_or_none(data.get("output_tokens")),
            calls=int(data.get("calls") or 0),
        )


@attrs.define(frozen=True)
class UsageRecord:
    """One document's (or scope's) token usage: the value stored as ``metadata["token_usage"]``.

    ``None`` in a token field means *unknown*, never zero. Use :meth:`to_dict` for the
    stored form and :meth:`from_dict` to read one back.
    """

    llm_input_tokens: int | None = 0
    llm_output_tokens: int | None = 0
    llm_calls: int = 0
    llm_cache_hits: int = 0
    embedding_tokens: int | None = 0
    embedding_calls: int = 0
    total_chunks: int = 0
    llm_model: str | None = None
    embedding_model: str | None = None
    models: Mapping[str, ModelUsage] = attrs.field(factory=dict)
    estimated: bool = False
    complete: bool = True
    faults: tuple[str, ...] = ()
    processing_start_time: int | None = None
    processing_end_time: int | None = None
    run_id: str | None = None
    revision: int = 0
    schema: int = SCHEMA_VERSION

    @property
    def total_tokens(self) -> int | None:
        """LLM input + LLM output + embedding tokens (``None`` if any part is unknown)."""
        return _add(_add(self.llm_input_tokens, self.llm_output_tokens), self.embedding_tokens)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready ``token_usage`` mapping."""
        return {
            "schema": self.schema,
            "llm_input_tokens": self.llm_input_tokens,
            "llm_output_tokens": self.llm_output_tokens,
            "llm_calls": self.llm_calls,
            "llm_cache_hits": self.llm_cache_hits,
            "embedding_tokens": self.embedding_tokens,
            "embedding_calls": self.embedding_calls,
            "total_tokens": self.total_tokens,
            "total_chunks": self.total_chunks,
            "llm_model": self.llm_model,
            "embedding_model": self.embedding_model,
            "models": {name: usage.to_dict() for name, usage in self.models.items()},
            "estimated": self.estimated,
            "complete": self.complete,
            "faults": list(self.faults),
            "processing_start_time": self.processing_start_time,
            "processing_end_time": self.processing_end_time,
            "run_id": self.run_id,
            "revision": self.revision,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UsageRecord:
        """Read a stored ``token_usage`` mapping (tolerates missing optional keys)."""
        models = data.get("models") or {}
        return cls(
            llm_input_tokens=_int_or_none(data.get("llm_input_tokens", 0)),
            llm_output_tokens=_int_or_none(data.get("llm_output_tokens", 0)),
            llm_calls=int(data.get("llm_calls") or 0),
            llm_cache_hits=int(data.get("llm_cache_hits") or 0),
            embedding_tokens=_int_or_none(data.get("embedding_tokens", 0)),
            embedding_calls=int(data.get("embedding_calls") or 0),
            total_chunks=int(data.get("total_chunks") or 0),
            llm_model=data.get("llm_model"),
            embedding_model=data.get("embedding_model"),
            models={str(k): ModelUsage.from_dict(v) for k, v in models.items()},
            estimated=bool(data.get("estimated", False)),
            complete=bool(data.get("complete", True)),
            faults=tuple(str(f) for f in data.get("faults") or ()),
            processing_start_time=_int_or_none(data.get("processing_start_time")),
            processing_end_time=_int_or_none(data.get("processing_end_time")),
            run_id=data.get("run_id"),
            revision=int(data.get("revision") or 0),
            schema=int(data.get("schema") or SCHEMA_VERSION),
        )


def _int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    return int(value)


class UsageScope:
    """A mutable, thread-safe accumulator of token usage.

    One exists per document being processed (and per :func:`tokmeter.scope`). Model
    calls made while the scope is current add to it; :meth:`snapshot` returns the
    immutable :class:`UsageRecord`.
    """

    def __init__(self, name: str, kind: ScopeKind = "custom", *, doc_id: str | None = None):
        self.name = name
        self.kind: ScopeKind = kind
        self.doc_id = doc_id
        self.run_id = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._llm_in: int | None = 0
        self._llm_out: int | None = 0
        self._llm_calls = 0
        self._cache_hits = 0
        self._emb: int | None = 0
        self._emb_calls = 0
        self._models: dict[str, ModelUsage] = {}
        self._estimated = False
        self._complete = True
        self._faults: list[str] = []
        self._chunks = 0
        self._start: int | None = None
        self._end: int | None = None
        self._revision = 0
        self._listeners: list[Callable[[UsageScope], None]] = []

    def __repr__(self) -> str:
        return f"<UsageScope {self.kind}:{self.name!r} rev={self._revision}>"

    # -- adding usage -------------------------------------------------------
    def add_llm(
        self,
        model: str,
        input_tokens: int | None,
        output_tokens: int | None,
        *,
        estimated: bool,
    ) -> None:
        """Add one LLM attempt."""
        with self._lock:
            self._llm_in = _add(self._llm_in, input_tokens)
            self._llm_out = _add(self._llm_out, output_tokens)
            self._llm_calls += 1
            self._bump_model(model, "llm", input_tokens, output_tokens, 1)
            self._estimated = self._estimated or estimated
            self._revision += 1
        if _observers:
            _tell_observers(self, "llm", model, input_tokens, output_tokens, estimated)
        self._notify()

    def add_embedding(self, model: str, tokens: int | None, *, estimated: bool) -> None:
        """Add this scope's share of one embedding call (counts as one call)."""
        with self._lock:
            self._emb = _add(self._emb, tokens)
            self._emb_calls += 1
            self._bump_model(model, "embedding", tokens, 0, 1)
            self._estimated = self._estimated or estimated
            self._revision += 1
        if _observers:
            _tell_observers(self, "embedding", model, tokens, 0, estimated)
        self._notify()

    def add_cache_hit(self) -> None:
        """Count an LLM call answered from LightRAG's response cache."""
        with self._lock:
            self._cache_hits += 1
            self._revision += 1
        self._notify()

    def add_fault(self, reason: str, *, incomplete: bool = False) -> None:
        """Record something that went wrong while metering; optionally mark incomplete."""
        with self._lock:
            if reason not in self._faults:
                self._faults.append(reason)
            if incomplete:
                self._complete = False
            self._revision += 1
        self._notify()

    def mark_incomplete(self, reason: str) -> None:
        """Mark the usage as partial (e.g. the document failed)."""
        self.add_fault(reason, incomplete=True)

    def set_chunks(self, count: int) -> None:
        with self._lock:
            self._chunks = count
            self._revision += 1

    def start(self) -> None:
        with self._lock:
            self._start = int(time.time())

    def stop(self) -> None:
        with self._lock:
            self._end = int(time.time())

    def _bump_model(
        self, model: str, kind: Kind, inp: int | None, out: int | None, calls: int
    ) -> None:
        old = self._models.get(model) or ModelUsage(kind=kind)
        self._models[model] = ModelUsage(
            kind=kind,
            input_tokens=_add(old.input_tokens, inp),
            output_tokens=_add(old.output_tokens, out),
            calls=old.calls + calls,
        )

    # -- late usage ---------------------------------------------------------
    def on_change(self, listener: Callable[[UsageScope], None]) -> None:
        """Call ``listener(scope)`` after every later change (used for late writes)."""
        with self._lock:
            self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener(self)

    # -- reading ------------------------------------------------------------
    @property
    def revision(self) -> int:
        return self._revision

    def snapshot(self) -> UsageRecord:
        """Return the current usage as an immutable :class:`UsageRecord`."""
        with self._lock:
            return UsageRecord(
                llm_input_tokens=self._llm_in,
                llm_output_tokens=self._llm_out,
                llm_calls=self._llm_calls,
                llm_cache_hits=self._cache_hits,
                embedding_tokens=self._emb,
                embedding_calls=self._emb_calls,
                total_chunks=self._chunks,
                llm_model=_main_model(self._models, "llm"),
                embedding_model=_main_model(self._models, "embedding"),
                models=dict(self._models),
                estimated=self._estimated,
                complete=self._complete,
                faults=tuple(self._faults),
                processing_start_time=self._start,
                processing_end_time=self._end,
                run_id=self.run_id,
                revision=self._revision,
            )


def _main_model(models: Mapping[str, ModelUsage], kind: Kind) -> str | None:
    """The model of ``kind`` with the most tokens (first seen wins a tie)."""
    best: str | None = None
    best_tokens = -1
    for name, usage in models.items():
        if usage.kind != kind:
            continue
        tokens = usage.tokens if usage.tokens is not None else 0
        if tokens > best_tokens:
            best, best_tokens = name, tokens
    return best
