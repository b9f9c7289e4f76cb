"""The `tokmeter` command line, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tokmeter._cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def offline_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    # an empty tiktoken cache, and any network use fails fast: proves nothing is downloaded
    env["TIKTOKEN_CACHE_DIR"] = str(tmp_path / "tiktoken-cache")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        env[var] = "http://127.0.0.1:9"
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    return env


def test_demo_json_works_offline(tmp_path: Path) -> None:
    result = run_cli("demo", "--json", "--workdir", str(tmp_path / "work"),
                     env=offline_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout)
    assert [r["file_path"] for r in rows] == [
        "01-orbital-bakery.txt", "02-harbour-survey.txt", "03-regional-chronicle.txt",
        "04-empty.txt", "05-corrupted-scan.txt"]
    by_file = {r["file_path"]: r for r in rows}
    for row in rows:
        assert set(row) == {"doc_id", "file_path", "status", "track_id", "token_usage"}
        assert row["token_usage"]["schema"] == 1
    long_doc = by_file["03-regional-chronicle.txt"]["token_usage"]
    short_doc = by_file["01-orbital-bakery.txt"]["token_usage"]
    assert long_doc["total_chunks"] > 5 and long_doc["total_tokens"] > 5 * short_doc["total_tokens"]
    assert short_doc["estimated"] is False and short_doc["complete"] is True
    empty = by_file["04-empty.txt"]
    assert empty["status"] == "processed" and empty["token_usage"]["total_chunks"] == 0
    failed = by_file["05-corrupted-scan.txt"]
    assert failed["status"] == "failed" and failed["token_usage"]["complete"] is False
    assert failed["token_usage"]["llm_calls"] >= 1
    assert "OFFLINE DEMO MODELS" in result.stderr
    assert "documents" in result.stderr  # progress output
    assert list((tmp_path / "tiktoken-cache").iterdir())  # rank files installed locally


def test_demo_table_shows_totals(tmp_path: Path) -> None:
    result = run_cli("demo", env=offline_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["document", "status", "chunks"]
    assert any(line.startswith("TOTAL") for line in lines)
    assert "failed (partial)" in result.stdout


def test_demo_refuses_a_used_workdir(tmp_path: Path) -> None:
    env = offline_env(tmp_path)
    assert run_cli("demo", "--json", "--workdir", str(tmp_path / "w"), env=env).returncode == 0
    again = run_cli("demo", "--workdir", str(tmp_path / "w"), env=env)
    assert again.returncode == 2 and "already holds a demo run" in again.stderr


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"]])
def test_help(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 0 and "usage: tokmeter" in result.stdout
