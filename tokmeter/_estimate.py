"""Local token estimates with tiktoken, used when a provider reports no usage."""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import tiktoken

from tokmeter._offline import OFFLINE_ENCODINGS, install_tiktoken_rank_files

logger = logging.getLogger("tokmeter")

#: Encoding used for models tiktoken does not know (open-weight and local models).
DEFAULT_ENCODING = "o200k_base"

_warned_models: set[str] = set()
_warn_lock = threading.Lock()


@functools.cache
def _encoding(name: str) -> tiktoken.Encoding:
    install_tiktoken_rank_files()
    return tiktoken.get_encoding(name)


@functools.lru_cache(maxsize=512)
def encoding_name_for(model: str | None) -> tuple[str, bool]:
    """Return ``(encoding name, known)`` for a model name.

    ``known`` is false when tiktoken does not know the model, or knows it under an
    encoding that is not available offline; the default encoding is used then.
    """
    if not model:
        return DEFAULT_ENCODING, False
    name = model.rsplit("/", 1)[-1]
    try:
        resolved = tiktoken.encoding_name_for_model(name)
    except KeyError:
        return DEFAULT_ENCODING, False
    if resolved not in OFFLINE_ENCODINGS:
        return DEFAULT_ENCODING, False
    return resolved, True


def note_unknown_model(model: str | None, kind: str) -> None:
    """Log once per model that its tokens are estimated with the default encoding."""
    key = f"{kind}:{model}"
    with _warn_lock:
        if key in _warned_models:
            return
        _warned_models.add(key)
    logger.warning(
        "tokmeter: %s model %r is unknown to tiktoken; its tokens are estimated with "
        "%s (set metered(..., encoding=...) to choose another)",
        kind,
        model,
        DEFAULT_ENCODING,
    )


def count_tokens(text: str, encoding: str = DEFAULT_ENCODING) -> int:
    """Count the tokens of ``text`` with a tiktoken encoding (special tokens as text)."""
    if not text:
        return 0
    return len(_encoding(encoding).encode_ordinary(text))


def count_tokens_batch(texts: list[str], encoding: str = DEFAULT_ENCODING) -> list[int]:
    """Count tokens for many texts."""
    if not texts:
        return []
    # One by one on purpose: tiktoken's batch encoder starts a thread pool per call,
    # which costs more than it saves for the few-kB texts LightRAG embeds.
    enc = _encoding(encoding)
    return [len(enc.encode_ordinary(text)) if text else 0 for text in texts]


def text_of_messages(messages: Any) -> str | None:
    """Join the text content of OpenAI-style chat messages; ``None`` if not text."""
    if not messages:
        return ""
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            return None
        content = message.get("content")
        if content is None:
            continue
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for piece in content:
                if isinstance(piece, dict) and isinstance(piece.get("text"), str):
                    parts.append(piece["text"])
                elif isinstance(piece, str):
                    parts.append(piece)
        else:
            return None
    return "\n".join(parts)
