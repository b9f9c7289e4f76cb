"""Hook a LightRAG instance so every document's doc-status record carries its token usage.

What is patched (instance attributes only; :func:`uninstrument` removes them):

* ``rag.process_single_document``: the per-document state machine runs inside the
  document's :class:`~tokmeter.UsageScope` (a ContextVar that LightRAG's call queues
  carry into the model functions).
* ``rag.doc_status.upsert``: the document's usage rides in the metadata of LightRAG's
  own PROCESSED / FAILED write, atomic with the status change, on every store.
* ``chunks_vdb`` / ``entities_vdb`` / ``relationships_vdb``: ``upsert`` records which
  document owns each text; their ``embedding_func`` exposes that map to metered
  embedding functions, because embedding is deferred and batched across documents.
* ``rag.llm_response_cache.get_by_id``: cache hits are counted (no tokens spent).
* ``rag.finalize_storages``: usage that arrived after a document's terminal write is
  delivered before the storages close.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import json
import logging
import threading
import warnings
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from tokmeter._context import attach, billing_scope, current_scope, detach, embedding_owners
from tokmeter._record import UsageRecord, UsageScope
from tokmeter.errors import IncompatibleLightRAGError, InstrumentationError

if TYPE_CHECKING:
    from tokmeter.backends import UsageStore

logger = logging.getLogger("tokmeter")

SUPPORTED_LIGHTRAG = ">=1.5,<1.6"
_ATTR = "_tokmeter_instrumentation"
_TERMINAL = {"processed", "failed"}
_VDB_NAMES = ("chunks_vdb", "entities_vdb", "relationships_vdb")
_QUERY_METHODS = ("aquery", "aquery_data", "aquery_llm")
#: Seconds to wait before each retry of a failed late write (then: kept, reported).
RETRY_DELAYS = (0.05, 0.2, 1.0, 3.0, 10.0)

_selftest_lock = threading.Lock()
_selftest_passed = False


def _status_value(status: Any) -> str:
    return str(getattr(status, "value", status)).lower()


def check_lightrag_version() -> str:
    """Return the installed LightRAG version, or raise if it is outside the tested range."""
    import lightrag

    version = getattr(lightrag, "__version__", "0")
    parsed = Version(version)
    if not (Version("1.5") <= parsed < Version("1.6")):
        raise IncompatibleLightRAGError(
            f"tokmeter supports lightrag-hku {SUPPORTED_LIGHTRAG}, found {version}. "
            "Per-document attribution depends on how this LightRAG line carries "
            "context into its model-call queues; install a supported version."
        )
    return version


def self_test_context_propagation() -> None:
    """Check that a ContextVar set by a caller reaches a function behind LightRAG's queue.

    Runs once per process, on a private event loop in a helper thread so it works
    whether or not the caller is inside a running loop. Raises
    :class:`InstrumentationError` when the value does not arrive.
    """
    global _selftest_passed
    with _selftest_lock:
        if _selftest_passed:
            return
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["seen"] = asyncio.run(_probe())
            except BaseException as exc:  # reported below
                outcome["error"] = exc

        thread = threading.Thread(target=run, name="tokmeter-selftest")
        thread.start()
        thread.join(30)
        if "error" in outcome:
            raise InstrumentationError(
                f"tokmeter self-test could not run LightRAG's call queue: {outcome['error']!r}"
            ) from outcome["error"]
        if outcome.get("seen") != "tokmeter-probe":
            raise InstrumentationError(
                "tokmeter self-test failed: a ContextVar set before calling a function "
                "through LightRAG's priority_limit_async_func_call did not reach it "
                f"(saw {outcome.get('seen')!r}). Per-document attribution cannot work "
                "with this LightRAG build."
            )
        _selftest_passed = True


async def _probe() -> Any:
    import contextvars

    from lightrag.utils import priority_limit_async_func_call

    probe: contextvars.ContextVar[str] = contextvars.ContextVar("tokmeter_probe", default="unset")

    async def read_probe() -> str:
        return probe.get()

    queued = priority_limit_async_func_call(1, queue_name="tokmeter self-test")(read_probe)
    probe.set("tokmeter-probe")
    try:
        return await queued()
    finally:
        shutdown = getattr(queued, "shutdown", None)
        if shutdown is not None:
            await shutdown(graceful=True)


class Instrumentation:
    """The metering attached to one LightRAG instance (returned by :func:`instrument`)."""

    def __init__(self, rag: Any, store: UsageStore | None) -> None:
        self.rag = rag
        self._store = store
        self._active: dict[str, UsageScope] = {}
        self._owners: dict[str, UsageScope] = {}
        # document scopes whose record reached the store with LightRAG's terminal write
        self._sealed: weakref.WeakSet[UsageScope] = weakref.WeakSet()
        self._restore: list[Callable[[], None]] = []
        self._late_lock = threading.Lock()
        self._late_pending: dict[str, UsageScope] = {}
        self._late_tasks: set[asyncio.Future[Any]] = set()
        self._undelivered: dict[str, UsageScope] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.retry_delays: tuple[float, ...] = RETRY_DELAYS
        self._queries = UsageScope("queries", "query")
        self._queries.start()

    # -- public -----------------------------------------------------------------
    @property
    def store(self) -> UsageStore:
        """The backend late usage is written through (chosen from the doc-status store)."""
        if self._store is None:
            from tokmeter.backends import store_for_rag

            self._store = store_for_rag(self.rag)
        return self._store

    def query_usage(self) -> UsageRecord:
        """Usage of this instance's queries (``aquery``, ``aquery_data``, ``aquery_llm``)
        made outside any scope of yours, since :func:`instrument`. Never billed to a
        document; streamed answers count when the stream ends."""
        return self._queries.snapshot()

    def undelivered(self) -> dict[str, Any]:
        """Documents whose late usage could not be written yet: ``{doc_id: UsageRecord}``."""
        with self._late_lock:
            return {doc_id: s.snapshot() for doc_id, s in self._undelivered.items()}

    async def flush(self, timeout: float = 30.0) -> bool:
        """Wait until late usage is written; retry what failed before. True if none is left."""
        with self._late_lock:
            retry = dict(self._undelivered)
            self._undelivered.clear()
        for doc_id, scope in retry.items():
            self._schedule_late(doc_id, scope)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            with self._late_lock:
                tasks = [t for t in self._late_tasks if not t.done()]
            if not tasks:
                break
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            await asyncio.wait(tasks, timeout=remaining)
        with self._late_lock:
            left = len(self._undelivered) + len(self._late_pending)
        if left:
            logger.error(
                "tokmeter: late usage of %d document(s) is not written yet: %s",
                left,
                ", ".join(sorted({*self._undelivered, *self._late_pending})),
            )
        return left == 0

    # -- installing ---------------------------------------------------------------
    def install(self) -> None:
        # Late usage still in memory at interpreter exit would vanish silently: report it.
        atexit.register(self._report_unwritten_at_exit)
        self._restore.append(lambda: atexit.unregister(self._report_unwritten_at_exit))
        rag = self.rag
        self._patch(rag, "process_single_document", self._wrap_process(rag.process_single_document))
        self._patch(rag.doc_status, "upsert", self._wrap_status_upsert(rag.doc_status.upsert))
        for name in _VDB_NAMES:
            vdb = getattr(rag, name, None)
            if vdb is None:
                continue
            self._patch(vdb, "upsert", self._wrap_vdb_upsert(vdb.upsert))
            embedding_func: Any = getattr(vdb, "embedding_func", None)
            inner: Any = getattr(embedding_func, "func", None)
            if inner is not None and dataclasses.is_dataclass(embedding_func):  # EmbeddingFunc
                owned = dataclasses.replace(embedding_func, func=self._wrap_owner_lookup(inner))  # type: ignore[type-var]
                self._patch(vdb, "embedding_func", owned)
        cache = getattr(rag, "llm_response_cache", None)
        if cache is not None:
            self._patch(cache, "get_by_id", self._wrap_cache_get(cache.get_by_id))
        self._patch(rag, "finalize_storages", self._wrap_finalize(rag.finalize_storages))
        for name in _QUERY_METHODS:
            method = getattr(rag, name, None)
            if method is not None:
                self._patch(rag, name, self._wrap_query(method))
        pipeline = getattr(rag, "apipeline_process_enqueue_documents", None)
        if pipeline is not None:
            self._patch(rag, "apipeline_process_enqueue_documents", self._wrap_pipeline(pipeline))

    def uninstall(self) -> None:
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()

    def _patch(self, target: Any, name: str, value: Any) -> None:
        had_own = name in getattr(target, "__dict__", {})
        previous = target.__dict__.get(name) if had_own else None
        object.__setattr__(target, name, value)

        def restore() -> None:
            if had_own:
                object.__setattr__(target, name, previous)
            else:
                try:
                    object.__delattr__(target, name)
                except AttributeError:
                    pass

        self._restore.append(restore)

    # -- wrappers -----------------------------------------------------------------
    def _wrap_process(
        self, original: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def process_single_document(*args: Any, **kwargs: Any) -> Any:
            doc_id = kwargs.get("doc_id")
            if not isinstance(doc_id, str):
                return await original(*args, **kwargs)
            usage = UsageScope(doc_id, "document", doc_id=doc_id)
            usage.start()
            self._active[doc_id] = usage
            token = attach(usage)
            try:
                return await original(*args, **kwargs)
            finally:
                detach(token)
                if self._active.get(doc_id) is usage:
                    del self._active[doc_id]
                if usage not in self._sealed:
                    logger.info(
                        "tokmeter: %s left processing without a PROCESSED/FAILED write "
                        "(cancelled or superseded); its usage was not stored: %s",
                        doc_id,
                        usage.snapshot().to_dict(),
                    )

        return process_single_document

    def _wrap_status_upsert(
        self, original: Callable[[dict[str, dict[str, Any]]], Awaitable[None]]
    ) -> Callable[[dict[str, dict[str, Any]]], Awaitable[None]]:
        async def upsert(data: dict[str, dict[str, Any]]) -> None:
            stamped: list[tuple[UsageScope, int]] = []
            try:
                for doc_id, payload in data.items():
                    usage = self._active.get(doc_id)
                    if usage is None or not isinstance(payload, dict):
                        continue
                    if _status_value(payload.get("status")) not in _TERMINAL:
                        continue
                    stamped.append((usage, self._stamp(usage, payload)))
            except Exception:  # never break LightRAG's own write
                logger.exception("tokmeter: could not add token_usage to a status write")
            await original(data)
            for usage, revision in stamped:
                self._seal(usage, revision)

        return upsert

    def _stamp(self, usage: UsageScope, payload: dict[str, Any]) -> int:
        """Put the document's record into LightRAG's status payload; return its revision."""
        if _status_value(payload.get("status")) == "failed":
            error = str(payload.get("error_msg") or "unknown error")
            usage.mark_incomplete(f"document failed: {error[:300]}")
        chunks = payload.get("chunks_count")
        if isinstance(chunks, int):
            usage.set_chunks(chunks)
            if chunks == 0 and _status_value(payload.get("status")) == "processed":
                usage.add_fault("empty document: LightRAG made no chunks, nothing to meter")
        usage.stop()
        record = usage.snapshot().to_dict()
        metadata = payload.get("metadata")
        metadata = dict(metadata) if isinstance(metadata, dict) else {}
        metadata["token_usage"] = record
        metadata["processing_start_time"] = record["processing_start_time"]
        metadata["processing_end_time"] = record["processing_end_time"]
        payload["metadata"] = metadata
        return int(record["revision"])

    def _seal(self, usage: UsageScope, stored_revision: int) -> None:
        """The record of ``stored_revision`` is in the store: later changes are late usage."""
        if usage in self._sealed:
            return
        self._sealed.add(usage)
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            pass
        doc_id = usage.doc_id or usage.name
        usage.on_change(lambda changed: self._late_change(doc_id, changed))
        if usage.revision != stored_revision:
            self._late_change(doc_id, usage)

    def _wrap_vdb_upsert(
        self, original: Callable[[dict[str, dict[str, Any]]], Awaitable[None]]
    ) -> Callable[[dict[str, dict[str, Any]]], Awaitable[None]]:
        async def upsert(data: dict[str, dict[str, Any]]) -> None:
            try:
                owner = current_scope()
                if owner is not None and data:
                    for record in data.values():
                        content = record.get("content") if isinstance(record, dict) else None
                        if isinstance(content, str):
                            self._owners[content] = owner
            except Exception:
                logger.exception("tokmeter: could not record the owners of upserted texts")
            await original(data)

        return upsert

    def _wrap_owner_lookup(
        self, func: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        owners = self._owners

        async def embed_with_owners(*args: Any, **kwargs: Any) -> Any:
            token = embedding_owners.set(owners.get)
            try:
                return await func(*args, **kwargs)
            finally:
                embedding_owners.reset(token)

        return embed_with_owners

    def _wrap_cache_get(
        self, original: Callable[[str], Awaitable[Any]]
    ) -> Callable[[str], Awaitable[Any]]:
        async def get_by_id(id: str) -> Any:
            result = await original(id)
            if result:
                try:
                    billing_scope().add_cache_hit()
                except Exception:
                    logger.exception("tokmeter: could not count an LLM cache hit")
            return result

        return get_by_id

    def _wrap_query(self, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def query(*args: Any, **kwargs: Any) -> Any:
            if current_scope() is not None:  # the caller's own scope wins
                return await original(*args, **kwargs)
            token = attach(self._queries)
            try:
                return await original(*args, **kwargs)
            finally:
                detach(token)

        query.__name__ = getattr(original, "__name__", "query")
        return query

    def _wrap_pipeline(
        self, original: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def apipeline_process_enqueue_documents(*args: Any, **kwargs: Any) -> Any:
            try:
                return await original(*args, **kwargs)
            finally:
                if not self._active:
                    # Every flush of this run is done: texts still mapped were never
                    # embedded (dropped with a failed batch) and cost nothing.
                    self._owners.clear()

        return apipeline_process_enqueue_documents

    def _wrap_finalize(
        self, original: Callable[[], Awaitable[Any]]
    ) -> Callable[[], Awaitable[Any]]:
        async def finalize_storages() -> Any:
            try:
                await self.flush()
            except Exception:
                logger.exception("tokmeter: delivering late usage before finalize failed")
            return await original()

        return finalize_storages

    # -- late usage ---------------------------------------------------------------
    def _report_unwritten_at_exit(self) -> None:
        with self._late_lock:
            left = {**self._late_pending, **self._undelivered}
        for doc_id, usage in sorted(left.items()):
            logger.error(
                "tokmeter: the process exits with usage of %s not written to the store "
                "(call `await instrumentation.flush()` or `rag.finalize_storages()` before "
                "exiting); the record was: %s",
                doc_id,
                json.dumps(usage.snapshot().to_dict()),
            )

    def _late_change(self, doc_id: str, usage: UsageScope) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            with self._late_lock:
                self._undelivered[doc_id] = usage
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._schedule_late(doc_id, usage)
        else:
            loop.call_soon_threadsafe(self._schedule_late, doc_id, usage)

    def _schedule_late(self, doc_id: str, usage: UsageScope) -> None:
        with self._late_lock:
            already = doc_id in self._late_pending
            self._late_pending[doc_id] = usage
        if already:
            return  # the running writer picks up the newest snapshot
        task = asyncio.ensure_future(self._deliver_late(doc_id))
        with self._late_lock:
            self._late_tasks.add(task)
        task.add_done_callback(self._late_tasks.discard)

    async def _deliver_late(self, doc_id: str) -> None:
        attempt = 0
        while True:
            with self._late_lock:
                usage = self._late_pending.get(doc_id)
            if usage is None:
                return
            record = usage.snapshot()
            try:
                written = await self.store.write_usage(doc_id, record)
            except Exception as exc:
                if attempt >= len(self.retry_delays):
                    with self._late_lock:
                        self._late_pending.pop(doc_id, None)
                        self._undelivered[doc_id] = usage
                    logger.error(
                        "tokmeter: could not write late usage of %s after %d attempts (%s); "
                        "kept in memory: call `await instrumentation.flush()` to retry",
                        doc_id,
                        attempt + 1,
                        exc,
                    )
                    return
                await asyncio.sleep(self.retry_delays[attempt])
                attempt += 1
                continue
            if written:
                logger.debug("tokmeter: wrote late usage of %s (revision %d)", doc_id,
                             record.revision)
            else:
                logger.info(
                    "tokmeter: late usage of %s not written: the stored record belongs to "
                    "another processing run (document was reset or reprocessed)",
                    doc_id,
                )
            with self._late_lock:
                if self._late_pending.get(doc_id) is usage and usage.revision == record.revision:
                    del self._late_pending[doc_id]
                    return
            attempt = 0  # more usage arrived while writing: write again


def instrument(rag: Any, *, store: UsageStore | None = None) -> Instrumentation:
    """Start metering a LightRAG instance's documents.

    Call it after constructing ``LightRAG(...)`` (before or after
    ``initialize_storages()``, before inserting documents). Idempotent: a second call
    warns and returns the existing :class:`Instrumentation`.

    Args:
        rag: The ``lightrag.LightRAG`` instance.
        store: Backend for usage that arrives after a document's terminal write.
            Default: chosen from the instance's doc-status storage.

    Raises:
        IncompatibleLightRAGError: LightRAG is outside ``>=1.5,<1.6``.
        InstrumentationError: the context-propagation self-test failed, or ``rag``
            does not look like a LightRAG instance.
    """
    existing = getattr(rag, _ATTR, None)
    if isinstance(existing, Instrumentation):
        warnings.warn(
            "tokmeter.instrument(): this LightRAG instance is already instrumented", stacklevel=2
        )
        return existing
    check_lightrag_version()
    for needed in ("process_single_document", "doc_status", "finalize_storages"):
        if not hasattr(rag, needed):
            raise InstrumentationError(
                f"tokmeter.instrument() needs a lightrag.LightRAG instance; {type(rag).__name__} "
                f"has no {needed!r}"
            )
    self_test_context_propagation()
    instrumentation = Instrumentation(rag, store)
    instrumentation.install()
    object.__setattr__(rag, _ATTR, instrumentation)
    return instrumentation


def uninstrument(rag: Any) -> None:
    """Stop metering a LightRAG instance (restores every patched attribute). Idempotent."""
    existing = getattr(rag, _ATTR, None)
    if not isinstance(existing, Instrumentation):
        warnings.warn(
            "tokmeter.uninstrument(): this LightRAG instance is not instrumented", stacklevel=2
        )
        return
    existing.uninstall()
    object.__delattr__(rag, _ATTR)


def instrumentation_of(rag: Any) -> Instrumentation | None:
    """Return the :class:`Instrumentation` of ``rag``, or ``None``."""
    found = getattr(rag, _ATTR, None)
    return found if isinstance(found, Instrumentation) else None
