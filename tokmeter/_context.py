"""Which accumulator a model call belongs to, resolved from a ContextVar."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from types import TracebackType

from tokmeter._record import ScopeKind, UsageRecord, UsageScope

_current: contextvars.ContextVar[UsageScope | None] = contextvars.ContextVar(
    "tokmeter_scope", default=None
)

# Embedded texts are attributed by owner, not by context: LightRAG embeds every
# pending text at flush time, whichever document triggered the flush. The
# instrumentation sets this to a lookup (text -> owning scope) around a vector
# store's embedding calls.
OwnerLookup = Callable[[str], "UsageScope | None"]
embedding_owners: contextvars.ContextVar[OwnerLookup | None] = contextvars.ContextVar(
    "tokmeter_embedding_owners", default=None
)

_unattributed_lock = threading.Lock()
_unattributed = UsageScope("unattributed", "unattributed")


def current_scope() -> UsageScope | None:
    """Return the scope model calls are billed to right now, or ``None`` outside any."""
    return _current.get()


def billing_scope() -> UsageScope:
    """The current scope, or the process-wide unattributed tally."""
    return _current.get() or _unattributed_scope()


def _unattributed_scope() -> UsageScope:
    with _unattributed_lock:
        return _unattributed


def unattributed_usage() -> UsageRecord:
    """Usage of metered calls made outside any scope (queries, parse-stage VLM calls...)."""
    return _unattributed_scope().snapshot()


def reset_unattributed() -> UsageRecord:
    """Return the unattributed tally and start a new, empty one."""
    global _unattributed
    with _unattributed_lock:
        old = _unattributed
        _unattributed = UsageScope("unattributed", "unattributed")
    return old.snapshot()


def attach(scope: UsageScope) -> contextvars.Token[UsageScope | None]:
    """Make ``scope`` current; pass the returned token to :func:`detach`."""
    return _current.set(scope)


def detach(token: contextvars.Token[UsageScope | None]) -> None:
    """Restore the scope that was current before :func:`attach`."""
    _current.reset(token)


class scope:
    """Open a usage accumulator for the code inside a ``with`` / ``async with`` block.

    Metered calls made inside (also in tasks and threads started with a copied
    context, such as ``asyncio.create_task`` and ``asyncio.to_thread``) add to it.
    Nested scopes do not mix: a call is billed to the innermost scope only.

    Example:
        >>> import tokmeter
        >>> with tokmeter.scope("nightly-report") as usage:
        ...     pass  # call metered model functions here
        >>> usage.snapshot().total_tokens
        0
    """

    def __init__(self, name: str, *, kind: ScopeKind = "custom") -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("tokmeter.scope() needs a non-empty name")
        self.usage = UsageScope(name, kind)
        self._tokens: list[contextvars.Token[UsageScope | None]] = []

    def __enter__(self) -> UsageScope:
        self.usage.start()
        self._tokens.append(attach(self.usage))
        return self.usage

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.usage.stop()
        detach(self._tokens.pop())

    async def __aenter__(self) -> UsageScope:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
