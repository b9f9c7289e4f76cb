"""Processes and HTTP helpers of the end-to-end API tests (real sockets on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
TERMINAL = ("processed", "failed")
T = TypeVar("T")

TOKMETER_CLI = "import sys; from tokmeter._cli import main; sys.exit(main(sys.argv[1:]))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def new_marker(kind: str = "k") -> str:
    """A document marker the fake provider recognises (``k`` normal, ``f`` fails)."""
    return f"tm{kind}{secrets.token_hex(5)}"


def document_text(marker: str, sentences: int = 4) -> str:
    lines = [f"Ada {marker} is an engineer at Works {marker}.",
             f"Works {marker} builds bridges and tunnels near the river.",
             f"Document {marker} records what Ada {marker} designed this year.",
             f"Ada {marker} reviewed the load tests of Works {marker} every week."]
    return " ".join(lines[i % len(lines)] for i in range(sentences))


class ManagedProcess:
    """A child process the tests started; stopped by PID (its children too)."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path,
                 log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(list(argv), env=dict(env), cwd=str(cwd),
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def children(self) -> list[int]:
        try:
            import psutil

            return [c.pid for c in psutil.Process(self.pid).children(recursive=True)]
        except Exception:
            return []

    def stop(self, timeout: float = 30) -> None:
        kids = self.children()
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for pid in kids:  # e.g. gunicorn workers, a multiprocessing manager
            deadline = time.monotonic() + 10
            while not _gone(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _gone(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()


def _gone(pid: int) -> bool:
    try:
        import psutil

        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except Exception:  # psutil.NoSuchProcess: it has exited
        return True


def wait_until_up(process: ManagedProcess, url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited with {process.proc.returncode}:\n"
                               f"{process.tail()}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{process.name} not up at {url} after {timeout}s:\n{process.tail()}")


class FakeProvider:
    """The OpenAI-compatible fake model server and what it billed."""

    def __init__(self, process: ManagedProcess, port: int) -> None:
        self.process = process
        self.base_url = f"http://{HOST}:{port}/v1"
        self._url = f"http://{HOST}:{port}"

    def log(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self._url}/_log", timeout=10)
        response.raise_for_status()
        return list(response.json())

    def billed(self, marker: str) -> dict[str, int]:
        """What this server billed for one document's requests (query requests excluded)."""
        chats = [e for e in self.log() if e["kind"] == "chat" and marker in e["markers"]
                 and not any(m.startswith("tmq") for m in e["markers"])]
        ok = [e for e in chats if e["status"] == 200]
        embedding_requests = [e for e in self.log() if e["kind"] == "embedding"]
        shares = [[t["tokens"] for t in e["texts"] if t["marker"] == marker]
                  for e in embedding_requests]
        return {
            "llm_input_tokens": sum(e["usage"]["prompt_tokens"] for e in ok),
            "llm_output_tokens": sum(e["usage"]["completion_tokens"] for e in ok),
            "llm_calls": len(ok),
            "failed_requests": len(chats) - len(ok),
            "embedding_tokens": sum(sum(s) for s in shares),
            "embedding_calls": sum(1 for s in shares if s),
        }


def start_provider(workdir: Path, env: Mapping[str, str]) -> FakeProvider:
    port = free_port()
    process = ManagedProcess(
        "fake provider", [sys.executable, str(HERE / "fake_openai_server.py"), str(port)],
        env, workdir, workdir / "fake_provider.log")
    provider = FakeProvider(process, port)
    wait_until_up(process, f"{provider.base_url}/models", timeout=60)
    return provider


def server_env(base: Mapping[str, str], provider: FakeProvider, *, working_dir: Path,
               workspace: str, port: int, log_dir: Path, **extra: str) -> dict[str, str]:
    """LightRAG server settings: JSON stores, openai bindings on the fake provider."""
    env = {k: v for k, v in base.items() if k != "GUNICORN_CMD_ARGS"}
    env.update({
        "HOST": HOST,
        "PORT": str(port),
        "WORKING_DIR": str(working_dir),
        "INPUT_DIR": str(working_dir.parent / "inputs"),
        "WORKSPACE": workspace,
        "LOG_DIR": str(log_dir),
        "LLM_BINDING": "openai",
        "LLM_MODEL": "fake-chat",
        "LLM_BINDING_HOST": provider.base_url,
        "LLM_BINDING_API_KEY": "sk-fake",
        "EMBEDDING_BINDING": "openai",
        "EMBEDDING_MODEL": "fake-embed",
        "EMBEDDING_DIM": "64",
        "EMBEDDING_BINDING_HOST": provider.base_url,
        "EMBEDDING_BINDING_API_KEY": "sk-fake",
        "ENTITY_EXTRACTION_USE_JSON": "false",
        "MAX_ASYNC": "4",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


class LightRAGServer:
    """A LightRAG API server subprocess: ``tokmeter serve``, its gunicorn mode, or stock."""

    def __init__(self, process: ManagedProcess, port: int, headers: Mapping[str, str]) -> None:
        self.process = process
        self.url = f"http://{HOST}:{port}"
        self.headers = dict(headers)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60, **kwargs)

    def stop(self) -> None:
        self.process.stop()


def start_server(kind: str, env: Mapping[str, str], rundir: Path,
                 headers: Mapping[str, str] | None = None,
                 extra_args: Sequence[str] = ()) -> LightRAGServer:
    """Start ``kind`` = ``tokmeter`` / ``tokmeter-gunicorn`` / ``stock``; wait for /health."""
    rundir.mkdir(parents=True, exist_ok=True)
    if kind == "tokmeter":
        argv = [sys.executable, "-c", TOKMETER_CLI, "serve", *extra_args]
    elif kind == "tokmeter-gunicorn":
        argv = [sys.executable, "-c", TOKMETER_CLI, "serve", "--gunicorn", *extra_args]
    elif kind == "stock":
        argv = [sys.executable, "-m", "lightrag.api.lightrag_server", *extra_args]
    else:
        raise ValueError(kind)
    port = int(env["PORT"])
    process = ManagedProcess(f"{kind} server", argv, env, rundir, rundir / "server.log")
    server = LightRAGServer(process, port, headers or {})
    try:
        wait_until_up(process, f"{server.url}/health")
    except BaseException:
        process.stop()
        raise
    return server


def eventually(check: Callable[[], T], timeout: float = 20, interval: float = 0.3) -> T:
    """Retry ``check`` until it stops raising AssertionError (re-raised at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(interval)


def wait_for_track(client: httpx.Client, track_id: str, count: int,
                   timeout: float = 90) -> list[dict[str, Any]]:
    """Poll ``/documents/track_status`` until ``count`` documents are processed or failed."""
    deadline = time.monotonic() + timeout
    documents: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        response = client.get(f"/documents/track_status/{track_id}")
        response.raise_for_status()
        documents = response.json()["documents"]
        if len(documents) >= count and all(d["status"] in TERMINAL for d in documents):
            return list(documents)
        time.sleep(0.3)
    raise AssertionError(f"track {track_id} not done after {timeout}s: {documents}")


def wait_pipeline_idle(client: httpx.Client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/documents/pipeline_status")
        if response.status_code == 200 and not response.json().get("busy"):
            return
        time.sleep(0.3)
    raise AssertionError("LightRAG's pipeline still busy")


def marker_of(document: Mapping[str, Any]) -> str:
    path = str(document.get("file_path") or "")
    return Path(path).stem


def record_figures(usage: Mapping[str, Any]) -> dict[str, int]:
    return {key: usage[key] for key in ("llm_input_tokens", "llm_output_tokens", "llm_calls",
                                        "embedding_tokens", "embedding_calls")}
