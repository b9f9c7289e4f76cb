"""``@metered``: count the tokens of a model function's calls and bill them to a scope."""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import math
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import attrs

from tokmeter._context import billing_scope, embedding_owners
from tokmeter._estimate import (
    count_tokens,
    count_tokens_batch,
    encoding_name_for,
    note_unknown_model,
    text_of_messages,
)
from tokmeter._record import Kind, UsageScope

logger = logging.getLogger("tokmeter")

F = TypeVar("F", bound=Callable[..., Any])

_KINDS = ("llm", "embedding")
_MODEL_KWARGS = ("model", "model_name", "embed_model")


@attrs.define(frozen=True)
class MeterSpec:
    """How a metered function is counted (available as ``fn.__tokmeter__``)."""

    kind: Kind
    model: str | None
    encoding: str | None
    passes_token_tracker: bool


class ProviderUsage:
    """The ``token_tracker`` sink handed to functions that accept one.

    LightRAG's openai, ollama and gemini bindings call ``add_usage(dict)`` with the
    provider's own ``prompt_tokens`` / ``completion_tokens`` / ``total_tokens``.
    """

    def __init__(self, forward: Any = None) -> None:
        self.input_tokens = 0
        self.output_tokens = 0
        self.reports = 0
        self.problems: list[str] = []
        self._forward = forward

    def add_usage(self, token_counts: Any) -> None:
        """Receive one usage report from a provider binding."""
        try:
            if self._forward is not None and self._forward is not self:
                self._forward.add_usage(token_counts)
        except Exception:  # the caller's own tracker must not break ours
            logger.exception("tokmeter: forwarding usage to the caller's token_tracker failed")
        parsed = parse_provider_usage(token_counts)
        if isinstance(parsed, str):
            self.problems.append(parsed)
            return
        self.input_tokens += parsed[0]
        self.output_tokens += parsed[1]
        self.reports += 1

    # LightRAG's TokenTracker API, so a sink can stand in wherever one is expected.
    def get_usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.input_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
            "call_count": self.reports,
        }

    def reset(self) -> None:
        self.input_tokens = self.output_tokens = self.reports = 0


def _count_value(value: Any, key: str) -> int | str:
    """A non-negative int, or a description of what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"malformed provider usage: {key}={value!r} is not a number"
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        return f"malformed provider usage: {key}={value!r} is not a whole number"
    if value < 0:
        return f"malformed provider usage: {key}={value!r} is negative"
    return int(value)


def parse_provider_usage(usage: Any) -> tuple[int, int] | str:
    """Read ``(input, output)`` tokens from an OpenAI-style usage dict or object.

    Returns a string describing the problem when the usage is malformed.
    """
    if usage is None:
        return "malformed provider usage: None"

    def field(name: str) -> Any:
        if isinstance(usage, Mapping):
            return usage.get(name)
        return getattr(usage, name, None)

    prompt = field("prompt_tokens")
    if prompt is None:
        prompt = field("input_tokens")
    completion = field("completion_tokens")
    if completion is None:
        completion = field("output_tokens")
    total = field("total_tokens")
    if prompt is None and completion is None and total is None:
        return f"malformed provider usage: no token counts in {usage!r:.200}"
    inp = _count_value(prompt, "prompt_tokens") if prompt is not None else None
    out = _count_value(completion, "completion_tokens") if completion is not None else 0
    for value in (inp, out):
        if isinstance(value, str):
            return value
    if inp is None:
        tot = _count_value(total, "total_tokens")
        if isinstance(tot, str):
            return tot
        inp = max(tot - cast(int, out), 0)
    return cast(int, inp), cast(int, out)


def _usage_of(result: Any) -> Any:
    if isinstance(result, Mapping):
        return result.get("usage")
    return getattr(result, "usage", None)


def _text_of_result(result: Any) -> str | None:
    """The generated text of an LLM result (str, OpenAI completion object or dict)."""
    if isinstance(result, str):
        return result
    try:
        choices = result["choices"] if isinstance(result, Mapping) else result.choices
        first = choices[0]
        message = first["message"] if isinstance(first, Mapping) else first.message
        content = message["content"] if isinstance(message, Mapping) else message.content
        return content if isinstance(content, str) else None
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def _text_of_chunk(chunk: Any) -> str:
    if isinstance(chunk, str):
        return chunk
    if isinstance(chunk, bytes):
        return chunk.decode("utf-8", "replace")
    try:
        choices = chunk["choices"] if isinstance(chunk, Mapping) else chunk.choices
        if not choices:
            return ""
        delta = choices[0]["delta"] if isinstance(choices[0], Mapping) else choices[0].delta
        content = delta["content"] if isinstance(delta, Mapping) else delta.content
        return content if isinstance(content, str) else ""
    except (AttributeError, KeyError, IndexError, TypeError):
        return ""


def _accepts_token_tracker(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    param = params.get("token_tracker")
    return param is not None and param.kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


_current_sink: contextvars.ContextVar[ProviderUsage | None] = contextvars.ContextVar(
    "tokmeter_usage_sink", default=None
)


def current_usage_sink() -> ProviderUsage | None:
    """The usage sink of the metered call running now (``None`` outside one).

    For code between a metered function and a provider binding that cannot take a
    ``token_tracker`` keyword through the function's own signature: pass this sink to
    the binding and its reports count for the running call.
    """
    return _current_sink.get()


class _Call:
    """Bookkeeping of one call of a metered function."""

    def __init__(
        self,
        spec: MeterSpec,
        signature: inspect.Signature | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.spec = spec
        self.signature = signature
        self.args = args
        self.kwargs = kwargs
        self.scope = billing_scope()
        self.owners = embedding_owners.get() if spec.kind == "embedding" else None
        self.recorded = False
        self._arguments: Mapping[str, Any] | None = None
        self.sink: ProviderUsage = ProviderUsage(forward=kwargs.get("token_tracker"))
        if spec.passes_token_tracker:
            self.kwargs = {**kwargs, "token_tracker": self.sink}

    # -- inputs -------------------------------------------------------------
    def _bound(self) -> Mapping[str, Any]:
        """The call's arguments by parameter name (bound once, on first need)."""
        if self._arguments is None:
            self._arguments = self._bind()
        return self._arguments

    def _bind(self) -> Mapping[str, Any]:
        if self.signature is None:
            return self.kwargs
        try:
            bound = self.signature.bind_partial(*self.args, **self.kwargs)
        except TypeError:
            return self.kwargs
        bound.apply_defaults()
        return bound.arguments

    def model(self, result: Any = None) -> str:
        if self.spec.model:
            return self.spec.model
        bound = self._bound()
        for key in _MODEL_KWARGS:
            value = bound.get(key)
            if isinstance(value, str) and value:
                return value
        found = getattr(result, "model", None)
        if isinstance(found, str) and found:
            return found
        return f"unknown-{self.spec.kind}"

    def _encoding(self, model: str) -> str:
        if self.spec.encoding:
            return self.spec.encoding
        name, known = encoding_name_for(model)
        if not known:
            note_unknown_model(model, self.spec.kind)
            self.scope.add_fault(f"model {model!r} unknown to tiktoken: estimated with {name}")
        return name

    def _llm_input_text(self) -> str | None:
        bound = self._bound()
        prompt = bound.get("prompt")
        if prompt is None and self.args:
            prompt = next((a for a in self.args if isinstance(a, str)), None)
        parts: list[str] = []
        if isinstance(prompt, str):
            parts.append(prompt)
        elif prompt is not None:
            as_text = text_of_messages(prompt if isinstance(prompt, list) else [prompt])
            if as_text is None:
                return None
            parts.append(as_text)
        system = bound.get("system_prompt")
        if isinstance(system, str):
            parts.append(system)
        for key in ("history_messages", "messages"):
            history = bound.get(key)
            if history:
                as_text = text_of_messages(history)
                if as_text is None:
                    return None
                parts.append(as_text)
        if prompt is None and not parts:
            return None
        return "\n".join(parts)

    def _embedding_texts(self) -> list[str] | None:
        bound = self._bound()
        texts = bound.get("texts")
        if texts is None:
            texts = bound.get("input")
        if texts is None and self.args:
            texts = self.args[0]
        if isinstance(texts, str):
            return [texts]
        if isinstance(texts, Sequence) and all(isinstance(t, str) for t in texts):
            return list(texts)
        return None

    # -- recording ------------------------------------------------------------
    def record_llm(
        self,
        result: Any,
        output_text: str | None,
        *,
        failed: bool = False,
        stream_usage: Any = None,
    ) -> None:
        if self.recorded:
            return
        self.recorded = True
        try:
            model = self.model(result)
            provider: tuple[int, int] | None = None
            problems: list[str] = []
            problems.extend(self.sink.problems)
            if self.sink.reports:
                provider = (self.sink.input_tokens, self.sink.output_tokens)
            if provider is None:
                for usage in (stream_usage, None if failed else _usage_of(result)):
                    if usage is None:
                        continue
                    parsed = parse_provider_usage(usage)
                    if isinstance(parsed, str):
                        problems.append(parsed)
                    else:
                        provider = parsed
                        break
            for problem in problems:
                logger.warning("tokmeter: %s (model %s); using an estimate", problem, model)
                self.scope.add_fault(problem)
            if provider is not None:
                self.scope.add_llm(model, provider[0], provider[1], estimated=False)
                return
            encoding = self._encoding(model)
            input_text = self._llm_input_text()
            inp = count_tokens(input_text, encoding) if input_text is not None else None
            if failed and output_text is None:
                out: int | None = 0
            else:
                out = count_tokens(output_text, encoding) if output_text is not None else None
            if inp is None or out is None:
                self.scope.add_fault(
                    f"{model}: could not read the text of a call; its tokens are unknown"
                )
            self.scope.add_llm(model, inp, out, estimated=True)
        except Exception as exc:  # metering never breaks the model call
            self._fault(exc)

    def record_embedding(self, result: Any, *, failed: bool = False) -> None:
        if self.recorded:
            return
        self.recorded = True
        try:
            model = self.model(result)
            texts = self._embedding_texts()
            provider_total: int | None = None
            for problem in self.sink.problems:
                self.scope.add_fault(problem)
            if self.sink.reports:
                provider_total = self.sink.input_tokens + self.sink.output_tokens
            if provider_total is None and not failed:
                usage = _usage_of(result)
                if usage is not None:
                    parsed = parse_provider_usage(usage)
                    if isinstance(parsed, str):
                        self.scope.add_fault(parsed)
                    else:
                        provider_total = parsed[0] + parsed[1]
            if texts is None:
                self.scope.add_fault(f"{model}: embedding input is not a list of texts")
                self.scope.add_embedding(model, provider_total, estimated=provider_total is None)
                return
            owners = self._owners(texts)
            if provider_total is not None:
                weights = count_tokens_batch(texts, self.spec.encoding or "o200k_base")
                shares = apportion(provider_total, weights)
                estimated = False
            else:
                encoding = self._encoding(model)
                shares = count_tokens_batch(texts, encoding)
                estimated = True
            per_scope: dict[int, tuple[UsageScope, int]] = {}
            for owner, share in zip(owners, shares, strict=True):
                held = per_scope.get(id(owner))
                per_scope[id(owner)] = (owner, (held[1] if held else 0) + share)
            for owner, tokens in per_scope.values():
                owner.add_embedding(model, tokens, estimated=estimated)
        except Exception as exc:
            self._fault(exc)

    def _owners(self, texts: list[str]) -> list[UsageScope]:
        lookup = self.owners
        if lookup is None:
            return [self.scope] * len(texts)
        found: list[UsageScope] = []
        for text in texts:
            owner = lookup(text)
            found.append(owner if owner is not None else self.scope)
        return found

    def _fault(self, exc: BaseException) -> None:
        logger.exception("tokmeter: metering a %s call failed", self.spec.kind)
        try:
            self.scope.add_fault(f"metering error: {type(exc).__name__}: {exc}", incomplete=True)
        except Exception:
            pass

    def record(self, result: Any, *, failed: bool = False) -> None:
        if self.spec.kind == "llm":
            self.record_llm(result, None if failed else _text_of_result(result), failed=failed)
        else:
            self.record_embedding(result, failed=failed)


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` so the parts add up to ``total`` exactly.

    Largest-remainder rounding; ties go to the earlier item. Equal split if all weights
    are zero.
    """
    n = len(weights)
    if n == 0:
        return []
    weight_sum = sum(weights)
    if weight_sum <= 0:
        weights = [1] * n
        weight_sum = n
    floors = [total * w // weight_sum for w in weights]
    remainders = [total * w % weight_sum for w in weights]
    missing = total - sum(floors)
    order = sorted(range(n), key=lambda i: (-remainders[i], i))
    for i in order[:missing]:
        floors[i] += 1
    return floors


class _MeteredStream:
    """Wraps a streaming LLM result; usage is recorded when the stream ends or is closed."""

    def __init__(self, inner: Any, call: _Call) -> None:
        self._inner = inner
        self._iter: Any = None
        self._call = call
        self._parts: list[str] = []
        self._usage: Any = None
        # A stream dropped without being read to the end is still billed for what it
        # produced (its input was sent).
        self._finalizer = weakref.finalize(self, _finish_stream, call, self._parts, None)

    def __aiter__(self) -> _MeteredStream:
        return self

    async def __anext__(self) -> Any:
        if self._iter is None:
            self._iter = self._inner.__aiter__()
        try:
            chunk = await self._iter.__anext__()
        except StopAsyncIteration:
            self._finish()
            raise
        except BaseException:
            self._finish(failed=True)
            raise
        usage = _usage_of(chunk) if not isinstance(chunk, str) else None
        if usage is not None:
            self._usage = usage
        self._parts.append(_text_of_chunk(chunk))
        return chunk

    async def aclose(self) -> None:
        try:
            closer = getattr(self._iter if self._iter is not None else self._inner, "aclose", None)
            if closer is not None:
                await closer()
        finally:
            self._finish()

    def _finish(self, failed: bool = False) -> None:
        self._finalizer.detach()
        _finish_stream(self._call, self._parts, self._usage, failed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _finish_stream(call: _Call, parts: list[str], usage: Any, failed: bool = False) -> None:
    call.record_llm(None, "".join(parts), stream_usage=usage, failed=failed)


def _is_stream(result: Any) -> bool:
    return hasattr(result, "__aiter__") and not isinstance(result, (str, bytes, Mapping))


def metered(
    kind: str,
    *,
    model: str | None = None,
    encoding: str | None = None,
    token_tracker: bool | None = None,
) -> Callable[[F], F]:
    """Meter the token usage of a model function.

    Args:
        kind: ``"llm"`` or ``"embedding"``.
        model: Model name to record. Defaults to the call's ``model`` argument or the
            model the provider's response names.
        encoding: tiktoken encoding for estimates (default: chosen from the model
            name, ``o200k_base`` for models tiktoken does not know).
        token_tracker: Pass a usage sink as the ``token_tracker`` keyword: ``None``
            (default) when the function declares that parameter, ``True`` always
            (for a ``**kwargs`` function that forwards it to a binding), ``False`` never.
            During the call the sink is also available as :func:`current_usage_sink`.

    Usage comes from the provider when possible: a function that accepts a
    ``token_tracker`` keyword (LightRAG's openai, ollama and gemini bindings do)
    receives a sink, and an OpenAI-style ``usage`` on the result is read. Otherwise the
    texts in and out are counted locally and the record says ``estimated: true``.
    Streaming results are counted when the stream ends. Every call that reaches the
    function counts, also one that raises (its input is estimated).

    Example:
        >>> import tokmeter
        >>> @tokmeter.metered("llm", model="gpt-4o-mini")
        ... async def llm(prompt, system_prompt=None, history_messages=None, **kwargs):
        ...     return "an answer"
    """
    if kind not in _KINDS:
        raise ValueError(f"metered() kind must be 'llm' or 'embedding', not {kind!r}")
    if model is not None and (not isinstance(model, str) or not model):
        raise ValueError("metered(model=...) must be a non-empty string")
    if encoding is not None:
        from tokmeter._offline import OFFLINE_ENCODINGS

        if encoding not in OFFLINE_ENCODINGS:
            raise ValueError(
                f"metered(encoding={encoding!r}) is not available offline; "
                f"choose one of {', '.join(OFFLINE_ENCODINGS)}"
            )

    def decorate(fn: F) -> F:
        if getattr(fn, "__tokmeter__", None) is not None:
            return fn  # already metered: never count a call twice
        spec = MeterSpec(
            kind=cast(Kind, kind),
            model=model,
            encoding=encoding,
            passes_token_tracker=(
                _accepts_token_tracker(fn) if token_tracker is None else bool(token_tracker)
            ),
        )
        try:
            signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            signature = None

        is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)
        )

        if is_async:

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                call = _Call(spec, signature, args, kwargs)
                sink_token = _current_sink.set(call.sink)
                try:
                    result = await fn(*args, **call.kwargs)
                except BaseException:
                    call.record(None, failed=True)
                    raise
                finally:
                    _current_sink.reset(sink_token)
                return _finish(call, result)

            wrapper: Callable[..., Any] = async_wrapper
        else:

            @functools.wraps(fn)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                call = _Call(spec, signature, args, kwargs)
                sink_token = _current_sink.set(call.sink)
                try:
                    result = fn(*args, **call.kwargs)
                except BaseException:
                    call.record(None, failed=True)
                    raise
                finally:
                    _current_sink.reset(sink_token)
                if inspect.isawaitable(result):
                    return _await_then_finish(call, result)
                return _finish(call, result)

            wrapper = sync_wrapper
        wrapper.__tokmeter__ = spec  # type: ignore[attr-defined]
        return cast(F, wrapper)

    return decorate


def _finish(call: _Call, result: Any) -> Any:
    if call.spec.kind == "llm" and _is_stream(result):
        return _MeteredStream(result, call)
    call.record(result)
    return result


async def _await_then_finish(call: _Call, awaitable: Awaitable[Any]) -> Any:
    try:
        result = await awaitable
    except BaseException:
        call.record(None, failed=True)
        raise
    return _finish(call, result)


def spec_of(fn: Any) -> MeterSpec | None:
    """Return how ``fn`` is metered, or ``None`` if it is not."""
    seen = 0
    while fn is not None and seen < 10:
        spec = getattr(fn, "__tokmeter__", None)
        if isinstance(spec, MeterSpec):
            return spec
        fn = getattr(fn, "func", None) or getattr(fn, "__wrapped__", None)
        seen += 1
    return None
