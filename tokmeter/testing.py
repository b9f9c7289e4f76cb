"""Helpers for asserting on metered usage in your own tests.

Example:
    >>> import asyncio, tokmeter
    >>> from tokmeter.testing import capture_usage
    >>> @tokmeter.metered("llm", model="gpt-4o-mini")
    ... async def llm(prompt, **kwargs):
    ...     return {"choices": [{"message": {"content": "hi"}}],
    ...             "usage": {"prompt_tokens": 12, "completion_tokens": 3}}
    >>> with capture_usage() as captured:
    ...     _ = asyncio.run(llm("hello"))
    >>> captured.usage.llm_input_tokens, captured.usage.llm_output_tokens
    (12, 3)
    >>> captured.calls[0].model
    'gpt-4o-mini'
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import attrs

from tokmeter._context import attach, detach
from tokmeter._record import UsageRecord, UsageScope, add_observer, remove_observer

__all__ = ["CapturedUsage", "MeteredCall", "capture_usage"]


@attrs.define(frozen=True)
class MeteredCall:
    """One addition to a scope: an LLM attempt, or one scope's share of an embedding call."""

    kind: str
    model: str
    input_tokens: int | None
    output_tokens: int | None
    estimated: bool
    scope: str
    scope_kind: str


@attrs.define
class CapturedUsage:
    """What :func:`capture_usage` saw."""

    scope: UsageScope
    calls: list[MeteredCall] = attrs.field(factory=list)

    @property
    def usage(self) -> UsageRecord:
        """Usage billed to the capture's own scope (calls not inside a document)."""
        return self.scope.snapshot()

    def for_scope(self, name: str) -> list[MeteredCall]:
        """The calls billed to the scope (e.g. the document id) called ``name``."""
        return [c for c in self.calls if c.scope == name]

    def tokens(self, kind: str | None = None, scope: str | None = None) -> int:
        """Sum of input + output tokens seen, optionally for one kind and/or scope."""
        return sum(
            (c.input_tokens or 0) + (c.output_tokens or 0)
            for c in self.calls
            if (kind is None or c.kind == kind) and (scope is None or c.scope == scope)
        )


@contextmanager
def capture_usage(name: str = "capture") -> Iterator[CapturedUsage]:
    """Capture metered usage inside the ``with`` block.

    The block runs in a fresh scope called ``name``, so calls made directly inside it
    are billed there (see :attr:`CapturedUsage.usage`) and not to any scope of yours.
    :attr:`CapturedUsage.calls` lists every metered addition made anywhere in the
    process while the block runs, with the scope it went to: documents that an
    instrumented LightRAG processes meanwhile appear under their doc ids.
    """
    captured = CapturedUsage(scope=UsageScope(name, "custom"))
    lock = threading.Lock()

    def observe(scope: UsageScope, kind: str, model: str, inp: int | None, out: int | None,
                estimated: bool) -> None:
        with lock:
            captured.calls.append(MeteredCall(kind, model, inp, out, estimated, scope.name,
                                              scope.kind))

    add_observer(observe)
    token = attach(captured.scope)
    captured.scope.start()
    try:
        yield captured
    finally:
        captured.scope.stop()
        detach(token)
        remove_observer(observe)
