"""@metered, scopes and the testing helper, without LightRAG."""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

import numpy as np
import pytest

import tokmeter
from tokmeter import count_tokens
from tokmeter.testing import capture_usage


def completion(text: str, usage: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"choices": [{"message": {"content": text}}]}
    if usage is not None:
        out["usage"] = usage
    return out


async def test_signature_and_metadata_are_kept() -> None:
    async def my_llm(
        prompt: str, system_prompt: str | None = None, *, temperature: float = 0.0, **kwargs: Any
    ) -> str:
        """My docstring."""
        return "ok"

    wrapped = tokmeter.metered("llm")(my_llm)
    assert inspect.signature(wrapped) == inspect.signature(my_llm)
    assert wrapped.__name__ == "my_llm" and wrapped.__doc__ == "My docstring."
    assert inspect.iscoroutinefunction(wrapped)
    assert tokmeter.metered("llm")(wrapped) is wrapped  # never metered twice


def test_bad_arguments_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="'llm' or 'embedding'"):
        tokmeter.metered("chat")
    with pytest.raises(ValueError, match="not available offline"):
        tokmeter.metered("llm", encoding="p50k_base")
    with pytest.raises(ValueError, match="non-empty"):
        tokmeter.metered("llm", model="")


async def test_provider_usage_through_token_tracker_wins() -> None:
    @tokmeter.metered("llm", model="gpt-4o-mini")
    async def llm(prompt: str, token_tracker: Any = None, **kwargs: Any) -> str:
        token_tracker.add_usage(
            {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}
        )
        return "x" * 1000

    async with tokmeter.scope("job") as usage:
        await llm("hello")
    record = usage.snapshot()
    assert (record.llm_input_tokens, record.llm_output_tokens, record.llm_calls) == (120, 30, 1)
    assert record.estimated is False and record.llm_model == "gpt-4o-mini"


async def test_callers_own_token_tracker_still_receives_usage() -> None:
    from lightrag.utils import TokenTracker

    @tokmeter.metered("llm", model="gpt-4o-mini")
    async def llm(prompt: str, token_tracker: Any = None) -> str:
        token_tracker.add_usage({"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11})
        return "ok"

    theirs = TokenTracker()
    with tokmeter.scope("s") as usage:
        await llm("p", token_tracker=theirs)
    assert theirs.get_usage()["total_tokens"] == 11
    assert usage.snapshot().total_tokens == 11


async def test_openai_style_usage_on_the_result_is_read() -> None:
    @tokmeter.metered("llm")
    async def llm(prompt: str, model: str = "gpt-4o") -> dict[str, Any]:
        return completion("answer", {"prompt_tokens": 40, "completion_tokens": 9})

    with tokmeter.scope("s") as usage:
        await llm("question")
    record = usage.snapshot()
    assert (record.llm_input_tokens, record.llm_output_tokens) == (40, 9)
    assert record.llm_model == "gpt-4o"  # taken from the call's model argument


async def test_no_usage_means_a_flagged_tiktoken_estimate() -> None:
    @tokmeter.metered("llm", model="gpt-4o")
    async def llm(
        prompt: str,
        system_prompt: str | None = None,
        history_messages: list[dict[str, str]] | None = None,
    ) -> str:
        return "The capital of France is Paris."

    history = [{"role": "user", "content": "earlier question"}]
    with tokmeter.scope("s") as usage:
        await llm(
            "What is the capital of France?", system_prompt="Be brief.", history_messages=history
        )
    record = usage.snapshot()
    expected_in = count_tokens("What is the capital of France?\nBe brief.\nearlier question")
    assert record.llm_input_tokens == expected_in
    assert record.llm_output_tokens == count_tokens("The capital of France is Paris.")
    assert record.estimated is True and record.faults == ()


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt_tokens": -5, "completion_tokens": 3},
        {"prompt_tokens": "many", "completion_tokens": 3},
        {"prompt_tokens": 1.5, "completion_tokens": 3},
        {"nothing": 1},
    ],
)
async def test_malformed_provider_usage_is_marked_and_estimated(bad: dict[str, Any]) -> None:
    @tokmeter.metered("llm", model="gpt-4o")
    async def llm(prompt: str, token_tracker: Any = None) -> str:
        token_tracker.add_usage(bad)
        return "four words of output"

    with tokmeter.scope("s") as usage:
        await llm("hello there")
    record = usage.snapshot()
    assert record.estimated is True
    assert record.llm_output_tokens == count_tokens("four words of output")
    assert any("malformed provider usage" in f for f in record.faults)


async def test_unknown_model_is_marked(caplog: pytest.LogCaptureFixture) -> None:
    @tokmeter.metered("llm", model="my-local-llama-3")
    async def llm(prompt: str) -> str:
        return "ok"

    with caplog.at_level(logging.WARNING, logger="tokmeter"), tokmeter.scope("s") as usage:
        await llm("hi")
    assert any("unknown to tiktoken" in f for f in usage.snapshot().faults)
    assert "my-local-llama-3" in caplog.text


async def test_streaming_counts_from_the_final_usage_chunk() -> None:
    class Chunk:
        def __init__(self, content: str | None, usage: Any = None) -> None:
            self.choices = (
                [type("C", (), {"delta": type("D", (), {"content": content})()})()]
                if content is not None
                else []
            )
            self.usage = usage

    @tokmeter.metered("llm", model="gpt-4o-mini")
    async def llm(prompt: str, stream: bool = True) -> Any:
        async def gen() -> Any:
            for word in ("Hel", "lo ", "world"):
                yield Chunk(word)
            yield Chunk(None, usage={"prompt_tokens": 17, "completion_tokens": 3})

        return gen()

    with tokmeter.scope("s") as usage:
        stream = await llm("say hello")
        assert usage.snapshot().llm_calls == 0  # not counted before the stream ends
        parts = [c async for c in stream]
    assert len(parts) == 4
    record = usage.snapshot()
    assert (record.llm_input_tokens, record.llm_output_tokens, record.estimated) == (17, 3, False)


async def test_streaming_text_without_usage_is_estimated_even_if_abandoned() -> None:
    @tokmeter.metered("llm", model="gpt-4o")
    async def llm(prompt: str) -> Any:
        async def gen() -> Any:
            for word in ["one ", "two ", "three ", "four "]:
                yield word

        return gen()

    with tokmeter.scope("s") as usage:
        stream = await llm("count")
        seen = []
        async for part in stream:
            seen.append(part)
            if len(seen) == 2:
                break
        await stream.aclose()
    record = usage.snapshot()
    assert record.llm_calls == 1 and record.estimated is True
    assert record.llm_output_tokens == count_tokens("one two ")


async def test_streaming_usage_reported_to_token_tracker_at_the_end() -> None:
    @tokmeter.metered("llm", model="gpt-4o")
    async def llm(prompt: str, token_tracker: Any = None) -> Any:
        async def gen() -> Any:
            yield "a"
            yield "b"
            token_tracker.add_usage(
                {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}
            )

        return gen()

    with tokmeter.scope("s") as usage:
        async for _ in await llm("x"):
            pass
    assert usage.snapshot().total_tokens == 10


async def test_failed_attempts_count_and_bill_their_input() -> None:
    @tokmeter.metered("llm", model="gpt-4o")
    async def llm(prompt: str) -> str:
        raise TimeoutError("provider timed out")

    with tokmeter.scope("s") as usage:
        for _ in range(2):
            with pytest.raises(TimeoutError):
                await llm("a long prompt")
    record = usage.snapshot()
    assert record.llm_calls == 2
    assert record.llm_input_tokens == 2 * count_tokens("a long prompt")
    assert record.llm_output_tokens == 0


def test_sync_functions_and_threads_keep_their_scope() -> None:
    @tokmeter.metered("llm", model="gpt-4o")
    def llm(prompt: str, token_tracker: Any = None) -> str:
        token_tracker.add_usage({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
        return "ok"

    async def main() -> tuple[int | None, int | None]:
        async def job(name: str, n: int) -> int | None:
            async with tokmeter.scope(name) as usage:
                for _ in range(n):
                    await asyncio.to_thread(llm, "p")
            return usage.snapshot().total_tokens

        a, b = await asyncio.gather(job("a", 2), job("b", 5))
        return a, b

    assert asyncio.run(main()) == (14, 35)


async def test_nested_and_concurrent_scopes_never_mix() -> None:
    @tokmeter.metered("llm", model="gpt-4o")
    async def llm(prompt: str, token_tracker: Any = None) -> str:
        n = int(prompt)
        await asyncio.sleep(0.001 * (n % 3))
        token_tracker.add_usage({"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n})
        return ""

    async def worker(n: int) -> int | None:
        async with tokmeter.scope(f"w{n}") as usage:
            await asyncio.gather(*(llm(str(n)) for _ in range(4)))
        return usage.snapshot().llm_input_tokens

    with tokmeter.scope("outer") as outer:
        await llm("100")
        with tokmeter.scope("inner") as inner:
            await llm("7")
        results = await asyncio.gather(*(worker(n) for n in range(1, 9)))
    assert results == [4 * n for n in range(1, 9)]
    assert inner.snapshot().llm_input_tokens == 7
    assert outer.snapshot().llm_input_tokens == 100


async def test_calls_outside_any_scope_go_to_the_unattributed_tally() -> None:
    @tokmeter.metered("embedding", model="text-embedding-3-small")
    async def embed(texts: list[str]) -> np.ndarray:
        return np.zeros((len(texts), 3))

    before = tokmeter.unattributed_usage().embedding_tokens
    await embed(["alpha beta", "gamma"])
    after = tokmeter.unattributed_usage()
    assert after.embedding_tokens - before == count_tokens("alpha beta") + count_tokens("gamma")
    assert tokmeter.reset_unattributed().embedding_calls >= 1
    assert tokmeter.unattributed_usage().embedding_calls == 0


def test_apportion_adds_up_exactly() -> None:
    assert tokmeter.apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert tokmeter.apportion(7, [0, 0]) == [4, 3]
    assert tokmeter.apportion(0, [5, 2]) == [0, 0]
    for total in (0, 1, 17, 1001):
        for weights in ([3, 1, 4, 1, 5], [1], [100, 1, 1]):
            parts = tokmeter.apportion(total, weights)
            assert sum(parts) == total and all(p >= 0 for p in parts)


async def test_capture_usage_sees_calls_and_their_scopes() -> None:
    @tokmeter.metered("llm", model="gpt-4o-mini")
    async def llm(prompt: str, token_tracker: Any = None) -> str:
        token_tracker.add_usage({"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12})
        return "ok"

    with capture_usage() as captured:
        await llm("a")
        async with tokmeter.scope("doc-1"):
            await llm("b")
    assert captured.usage.total_tokens == 12
    assert [c.scope for c in captured.calls] == ["capture", "doc-1"]
    assert captured.tokens(scope="doc-1") == 12 and captured.tokens(kind="embedding") == 0
    await llm("after")  # not captured any more
    assert len(captured.calls) == 2


async def test_text_that_looks_like_special_tokens_is_counted_not_rejected() -> None:
    @tokmeter.metered("llm", model="gpt-4o")
    async def llm(prompt: str) -> str:
        return "<|endoftext|>"

    with tokmeter.scope("s") as usage:
        await llm("<|endoftext|> is just text here")
    assert usage.snapshot().llm_output_tokens == count_tokens("<|endoftext|>") > 1
