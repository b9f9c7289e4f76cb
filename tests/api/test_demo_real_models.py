"""`tokmeter demo` on "real" models: LightRAG's openai binding against an
OpenAI-compatible server on loopback, with provider-reported usage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.api.harness import FakeProvider


def test_demo_with_an_openai_compatible_endpoint_bills_what_the_provider_reported(
        base_env: dict[str, str], provider: FakeProvider, tmp_path: Path) -> None:
    before = len(provider.log())
    result = subprocess.run(
        [sys.executable, "-m", "tokmeter._cli", "demo", "--json", "--workdir",
         str(tmp_path / "work"), "--openai-base-url", provider.base_url, "--llm-model",
         "fake-chat", "--embedding-model", "fake-embedder", "--embedding-dim", "64",
         "--api-key", "test-key"],
        env=base_env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OpenAI-compatible endpoint" in result.stderr
    rows = json.loads(result.stdout)
    served = provider.log()[before:]

    usage = [r["token_usage"] for r in rows]
    assert all(r["status"] == "processed" for r in rows)  # real models do not fail on purpose
    with_chunks = [u for u in usage if u["total_chunks"] > 0]
    assert with_chunks and all(u["estimated"] is False for u in with_chunks)
    assert all(u["llm_model"] == "fake-chat" for u in with_chunks)
    chats = [e for e in served if e["kind"] == "chat" and e["status"] == 200]
    embeddings = [e for e in served if e["kind"] == "embedding"]
    assert sum(u["llm_input_tokens"] for u in usage) == sum(
        e["usage"]["prompt_tokens"] for e in chats)
    assert sum(u["llm_output_tokens"] for u in usage) == sum(
        e["usage"]["completion_tokens"] for e in chats)
    assert sum(u["embedding_tokens"] for u in usage) == sum(
        e["usage"]["prompt_tokens"] for e in embeddings)
