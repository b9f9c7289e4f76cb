"""The interface every usage store implements, and the work they share."""

from __future__ import annotations

import abc
import datetime as dt
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs

from tokmeter._record import UsageRecord
from tokmeter.errors import InvalidWorkspaceError, StoreError

GroupBy = Literal["model", "day", "track_id"]
GROUP_BY_CHOICES: tuple[str, ...] = ("model", "day", "track_id")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def validate_workspace(workspace: str) -> str:
    """Return ``workspace`` unchanged if it is a usable name, else raise.

    The empty string is LightRAG's default workspace. A name is one path component
    without control characters, at most 200 characters. Anything else (quotes, ``$``,
    dots, SQL) is stored and matched literally by every backend.
    """
    if not isinstance(workspace, str):
        raise InvalidWorkspaceError(f"workspace must be a string, not {type(workspace).__name__}")
    if len(workspace) > 200:
        raise InvalidWorkspaceError("workspace name is longer than 200 characters")
    if workspace in (".", "..") or "/" in workspace or "\\" in workspace:
        raise InvalidWorkspaceError(
            f"workspace {workspace!r} is not a single path component (no '/', '\\', '.', '..')"
        )
    if _CONTROL.search(workspace):
        raise InvalidWorkspaceError(f"workspace {workspace!r} contains control characters")
    return workspace


@attrs.define(frozen=True)
class DocumentUsage:
    """One document's doc-status facts plus its token usage (``None`` if never metered)."""

    doc_id: str
    workspace: str
    status: str
    track_id: str | None
    file_path: str | None
    usage: UsageRecord | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "doc_id": self.doc_id,
            "workspace": self.workspace,
            "status": self.status,
            "track_id": self.track_id,
            "file_path": self.file_path,
            "token_usage": self.usage.to_dict() if self.usage is not None else None,
        }


@attrs.define(frozen=True)
class UsageTotals:
    """Summed usage of a group of documents (one row of :meth:`UsageStore.aggregate`)."""

    key: str | None
    documents: int = 0
    llm_input_tokens: int = 0
    llm_output_tokens: int = 0
    embedding_tokens: int = 0
    total_tokens: int = 0
    llm_calls: int = 0
    embedding_calls: int = 0
    llm_cache_hits: int = 0
    estimated_documents: int = 0
    incomplete_documents: int = 0

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


#: The counted fields of :class:`UsageTotals`, in order (every field but ``key``).
TOTAL_FIELDS: tuple[str, ...] = tuple(
    f.name for f in attrs.fields(UsageTotals) if f.name != "key"
)


def totals_from_row(key: str | None, row: Any) -> UsageTotals:
    """A :class:`UsageTotals` from a database row holding every :data:`TOTAL_FIELDS` column."""
    return UsageTotals(key=key, **{name: int(row[name] or 0) for name in TOTAL_FIELDS})


def status_text(status: Any) -> str:
    return str(getattr(status, "value", status)).lower()


def usage_from_metadata(metadata: Any) -> UsageRecord | None:
    """Read ``metadata["token_usage"]`` (returns ``None`` when absent or unreadable)."""
    if not isinstance(metadata, Mapping):
        return None
    raw = metadata.get("token_usage")
    if not isinstance(raw, Mapping):
        return None
    try:
        return UsageRecord.from_dict(raw)
    except (TypeError, ValueError):
        return None


def document_from_row(doc_id: str, workspace: str, row: Mapping[str, Any],
                      metadata: Any) -> DocumentUsage:
    """A :class:`DocumentUsage` from a doc-status row of any store."""
    return DocumentUsage(
        doc_id=doc_id,
        workspace=workspace,
        status=status_text(row.get("status")),
        track_id=row.get("track_id"),
        file_path=row.get("file_path"),
        usage=usage_from_metadata(metadata),
    )


def epoch(value: dt.datetime | float | None) -> int | None:
    """Unix seconds of a datetime (naive = UTC) or a number."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return int(value.timestamp())
    return int(value)


def day_of(epoch_seconds: int | None) -> str | None:
    if epoch_seconds is None:
        return None
    return dt.datetime.fromtimestamp(epoch_seconds, dt.timezone.utc).date().isoformat()


def sum_usage(rows: Iterable[tuple[str | None, UsageRecord]]) -> list[UsageTotals]:
    """Fold ``(key, record)`` pairs into totals per key, sorted by key."""
    acc: dict[str | None, dict[str, int]] = {}
    for key, record in rows:
        t = acc.setdefault(key, dict.fromkeys(TOTAL_FIELDS, 0))
        t["documents"] += 1
        t["llm_input_tokens"] += record.llm_input_tokens or 0
        t["llm_output_tokens"] += record.llm_output_tokens or 0
        t["embedding_tokens"] += record.embedding_tokens or 0
        t["total_tokens"] += record.total_tokens or 0
        t["llm_calls"] += record.llm_calls
        t["embedding_calls"] += record.embedding_calls
        t["llm_cache_hits"] += record.llm_cache_hits
        t["estimated_documents"] += int(record.estimated)
        t["incomplete_documents"] += int(not record.complete)
    return [UsageTotals(key=k, **v) for k, v in sorted(acc.items(), key=lambda kv: str(kv[0]))]


class UsageStore(abc.ABC):
    """Reads and writes ``metadata["token_usage"]`` in one workspace of a doc-status store.

    Public methods validate their arguments and delegate to the ``_``-prefixed
    methods each backend implements. Every operation is confined to
    :attr:`workspace`.
    """

    #: Short backend name (``"json"``, ``"postgres"``, ``"mongo"``).
    backend: str = "?"

    def __init__(self, workspace: str) -> None:
        self.workspace = validate_workspace(workspace)

    async def __aenter__(self) -> UsageStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Connect / load. Called by ``async with``; idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release connections this store opened itself (never the caller's)."""

    async def get_usage(self, doc_id: str) -> DocumentUsage | None:
        """One document's usage (``None`` if the document does not exist)."""
        _check_id(doc_id, "doc_id")
        return await self._get(doc_id)

    async def usage_for_track(self, track_id: str) -> list[DocumentUsage]:
        """Usage of every document uploaded under ``track_id``, sorted by doc_id."""
        _check_id(track_id, "track_id")
        found = await self._list_track(track_id)
        return sorted(found, key=lambda d: d.doc_id)

    async def write_usage(self, doc_id: str, record: UsageRecord) -> bool:
        """Replace a document's ``token_usage`` with a newer snapshot of the same run.

        Written only if the stored record has the same ``run_id`` and a lower
        ``revision`` (so a retried or out-of-order write is harmless, and a document
        that was reset or reprocessed is left alone). Other metadata keys are never
        touched. Returns whether the record was written.
        """
        _check_id(doc_id, "doc_id")
        if record.run_id is None:
            raise StoreError("write_usage() needs a record with a run_id")
        return await self._write(doc_id, record)

    async def aggregate(
        self,
        *,
        since: dt.datetime | int | None = None,
        until: dt.datetime | int | None = None,
        group_by: str | None = None,
        track_id: str | None = None,
    ) -> list[UsageTotals]:
        """Totals of the workspace's metered documents.

        Args:
            since: Only documents whose processing ended at or after this time.
            until: Only documents whose processing ended before this time.
            group_by: ``"model"`` (per-model tokens and calls), ``"day"`` (UTC day of
                processing end), ``"track_id"``, or ``None`` for one total row.
            track_id: Only documents of this upload.
        """
        if group_by is not None and group_by not in GROUP_BY_CHOICES:
            raise StoreError(
                f"group_by must be one of {', '.join(GROUP_BY_CHOICES)} (or None), "
                f"not {group_by!r}"
            )
        if track_id is not None:
            _check_id(track_id, "track_id")
        totals = await self._aggregate(epoch(since), epoch(until), group_by, track_id)
        # One order for every backend, so outputs compare across stores.
        return sorted(totals, key=lambda t: str(t.key))

    async def workspace_exists(self) -> bool:
        """Whether the store holds any doc-status data for this workspace."""
        return await self._workspace_exists()

    async def merge_usage_delta(
        self, doc_id: str, delta: Mapping[str, Any] | UsageDelta, *, run_id: str | None = None
    ) -> bool:
        """Atomically add counts to a document's stored ``token_usage``.

        For usage that arrives after the document's record was written (a failed
        document's texts embedded later by a sibling's flush). ``delta`` holds
        non-negative integers to add, for example::

            await store.merge_usage_delta("doc-1", {
                "embedding_tokens": 120, "embedding_calls": 1,
                "models": {"text-embedding-3-small": {"kind": "embedding",
                                                      "input_tokens": 120, "calls": 1}},
            })

        Keys are those of :data:`USAGE_DELTA_KEYS` plus ``models`` (per model:
        :data:`MODEL_DELTA_KEYS`, and ``kind`` used when the model is new).
        ``total_tokens`` and a model's ``tokens`` default to the sum of the token
        counts given. A stored ``null`` (unknown) stays unknown. Other metadata
        keys, and the record's ``run_id`` and ``revision``, are never touched.

        Args:
            doc_id: The document.
            delta: The counts to add (or a parsed :class:`UsageDelta`).
            run_id: If given, merge only when the stored record belongs to this run.

        Returns:
            Whether the delta was added (``False`` if the document, or its
            ``token_usage``, does not exist, or ``run_id`` differs).
        """
        _check_id(doc_id, "doc_id")
        if run_id is not None:
            _check_id(run_id, "run_id")
        parsed = delta if isinstance(delta, UsageDelta) else UsageDelta.parse(delta)
        return await self._merge_delta(doc_id, parsed, run_id)

    async def _merge_delta(self, doc_id: str, delta: UsageDelta, run_id: str | None) -> bool:
        # Not abstract, so that stores written before deltas existed still load.
        raise StoreError(f"the {self.backend} usage store cannot merge usage deltas")

    # -- backend hooks -----------------------------------------------------------
    @abc.abstractmethod
    async def _get(self, doc_id: str) -> DocumentUsage | None: ...

    @abc.abstractmethod
    async def _list_track(self, track_id: str) -> list[DocumentUsage]: ...

    @abc.abstractmethod
    async def _write(self, doc_id: str, record: UsageRecord) -> bool: ...

    @abc.abstractmethod
    async def _aggregate(
        self, since: int | None, until: int | None, group_by: str | None, track_id: str | None
    ) -> list[UsageTotals]: ...

    @abc.abstractmethod
    async def _workspace_exists(self) -> bool: ...


#: Top-level ``token_usage`` counters :meth:`UsageStore.merge_usage_delta` can add to.
USAGE_DELTA_KEYS: tuple[str, ...] = (
    "llm_input_tokens", "llm_output_tokens", "llm_calls", "llm_cache_hits",
    "embedding_tokens", "embedding_calls", "total_tokens",
)
#: Per-model counters (``models.<name>.*``) a delta can add to.
MODEL_DELTA_KEYS: tuple[str, ...] = ("input_tokens", "output_tokens", "tokens", "calls")

# Mongo stores int64; a larger count is a bug upstream, not usage.
_MAX_DELTA = 2**62


def _delta_count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_DELTA:
        raise StoreError(f"{where} must be a non-negative integer, not {value!r}")
    return value


def _add_count(container: Mapping[str, Any], key: str, amount: int) -> Any:
    """``container[key] + amount`` where null (unknown) stays null and a missing or
    non-numeric value counts as 0. Every backend implements exactly this rule."""
    if key in container and container[key] is None:
        return None
    current = container.get(key)
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        return current + amount
    return amount


@attrs.define(frozen=True)
class ModelDelta:
    """Counts to add to one model's entry in ``token_usage["models"]``."""

    kind: Literal["llm", "embedding"] | None
    counts: Mapping[str, int]


@attrs.define(frozen=True)
class UsageDelta:
    """A validated usage delta (see :meth:`UsageStore.merge_usage_delta`)."""

    counts: Mapping[str, int]
    models: Mapping[str, ModelDelta] = attrs.field(factory=dict)

    @classmethod
    def parse(cls, delta: Mapping[str, Any]) -> UsageDelta:
        """Validate a delta mapping; raises :class:`StoreError` saying what is wrong."""
        if not isinstance(delta, Mapping):
            raise StoreError(f"a usage delta must be a mapping, not {type(delta).__name__}")
        allowed = (*USAGE_DELTA_KEYS, "models")
        unknown = sorted(str(k) for k in delta if k not in allowed)
        if unknown:
            raise StoreError(
                f"unknown usage delta key(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(allowed)}"
            )
        counts = {k: _delta_count(v, f"delta[{k!r}]") for k, v in delta.items() if k != "models"}
        if "total_tokens" not in counts and any(
            k in counts for k in ("llm_input_tokens", "llm_output_tokens", "embedding_tokens")
        ):
            counts["total_tokens"] = (counts.get("llm_input_tokens", 0)
                                      + counts.get("llm_output_tokens", 0)
                                      + counts.get("embedding_tokens", 0))
        raw_models = delta.get("models") or {}
        if not isinstance(raw_models, Mapping):
            raise StoreError("delta['models'] must map model names to their counts")
        models: dict[str, ModelDelta] = {}
        for name, raw in raw_models.items():
            if not isinstance(name, str) or not name:
                raise StoreError(f"model names must be non-empty strings, not {name!r}")
            if not isinstance(raw, Mapping):
                raise StoreError(f"delta['models'][{name!r}] must be a mapping of counts")
            unknown = sorted(str(k) for k in raw if k not in (*MODEL_DELTA_KEYS, "kind"))
            if unknown:
                raise StoreError(
                    f"unknown key(s) {', '.join(map(repr, unknown))} in delta['models'][{name!r}]"
                    f"; allowed: kind, {', '.join(MODEL_DELTA_KEYS)}"
                )
            kind = raw.get("kind")
            if kind not in (None, "llm", "embedding"):
                raise StoreError(
                    f"delta['models'][{name!r}]['kind'] must be 'llm' or 'embedding', not {kind!r}"
                )
            model_counts = {k: _delta_count(v, f"delta['models'][{name!r}][{k!r}]")
                            for k, v in raw.items() if k != "kind"}
            if "tokens" not in model_counts and (
                "input_tokens" in model_counts or "output_tokens" in model_counts
            ):
                model_counts["tokens"] = (model_counts.get("input_tokens", 0)
                                          + model_counts.get("output_tokens", 0))
            models[name] = ModelDelta(kind=kind, counts=model_counts)
        return cls(counts=counts, models=models)

    def apply(self, token_usage: Mapping[str, Any]) -> dict[str, Any]:
        """Return ``token_usage`` with this delta added (the reference semantics)."""
        merged = dict(token_usage)
        for key, amount in self.counts.items():
            merged[key] = _add_count(token_usage, key, amount)
        if self.models:
            stored = token_usage.get("models")
            models = dict(stored) if isinstance(stored, Mapping) else {}
            for name, model in self.models.items():
                entry = models.get(name)
                if not isinstance(entry, Mapping):
                    entry = {"kind": model.kind or "llm", **dict.fromkeys(MODEL_DELTA_KEYS, 0)}
                updated = dict(entry)
                for key, amount in model.counts.items():
                    updated[key] = _add_count(entry, key, amount)
                models[name] = updated
            merged["models"] = models
        return merged


def _check_id(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise StoreError(f"{what} must be a non-empty string, not {value!r}")


def model_totals(key: str, *, documents: int, embedding: bool, input_tokens: int,
                 output_tokens: int, calls: int) -> UsageTotals:
    """One ``group_by="model"`` row: an embedding model's input tokens are embedding tokens."""
    return UsageTotals(
        key=key,
        documents=documents,
        llm_input_tokens=0 if embedding else input_tokens,
        llm_output_tokens=0 if embedding else output_tokens,
        embedding_tokens=input_tokens if embedding else 0,
        total_tokens=input_tokens + output_tokens,
        llm_calls=0 if embedding else calls,
        embedding_calls=calls if embedding else 0,
    )


def group_records(
    records: list[tuple[str | None, UsageRecord]], group_by: str | None
) -> list[UsageTotals]:
    """Aggregate in Python (used by the JSON store, which has no query engine)."""
    if group_by != "model":
        return sum_usage(records)
    per_model: dict[str, dict[str, Any]] = {}
    for _, record in records:
        for name, usage in record.models.items():
            t = per_model.setdefault(
                name, {"kind": usage.kind, "documents": 0, "in": 0, "out": 0, "calls": 0}
            )
            t["documents"] += 1
            t["in"] += usage.input_tokens or 0
            t["out"] += usage.output_tokens or 0
            t["calls"] += usage.calls
    return [
        model_totals(name, documents=t["documents"], embedding=t["kind"] == "embedding",
                     input_tokens=t["in"], output_tokens=t["out"], calls=t["calls"])
        for name, t in sorted(per_model.items())
    ]


def aggregate_records(
    rows: Iterable[tuple[str | None, UsageRecord | None]],
    *,
    since: int | None = None,
    until: int | None = None,
    group_by: str | None = None,
    track_id: str | None = None,
) -> list[UsageTotals]:
    """``UsageStore.aggregate`` in Python over ``(track_id, record)`` pairs.

    The rules every backend follows: records that are missing are skipped, the time
    window applies to ``processing_end_time`` (``[since, until)``), days are UTC. The
    JSON store (which has no query engine) aggregates with this.
    """
    picked: list[tuple[str | None, UsageRecord]] = []
    for row_track, record in rows:
        if record is None or (track_id is not None and row_track != track_id):
            continue
        end = record.processing_end_time
        if since is not None and (end is None or end < since):
            continue
        if until is not None and (end is None or end >= until):
            continue
        key = day_of(end) if group_by == "day" else row_track if group_by == "track_id" else None
        picked.append((key, record))
    return group_records(picked, group_by)
