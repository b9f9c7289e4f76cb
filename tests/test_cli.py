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


def test_usage_command_reads_and_aggregates_a_json_store(tmp_path: Path) -> None:
    env = offline_env(tmp_path)
    work = tmp_path / "work"
    demo = run_cli("demo", "--json", "--workdir", str(work), env=env)
    assert demo.returncode == 0, demo.stderr[-2000:]
    rows = json.loads(demo.stdout)
    track_id = rows[0]["track_id"]

    listed = run_cli("usage", "--store", f"json:{work}", "--workspace", "demo",
                     "--track-id", track_id, "--format", "json", env=env)
    assert listed.returncode == 0, listed.stderr
    docs = {d["doc_id"]: d for d in json.loads(listed.stdout)}
    assert {r["doc_id"]: r["token_usage"] for r in rows} == {
        k: d["token_usage"] for k, d in docs.items()}

    totals = run_cli("usage", "--store", f"json:{work}", "--workspace", "demo",
                     "--format", "json", env=env)
    (total,) = json.loads(totals.stdout)
    assert total["documents"] == 5
    assert total["total_tokens"] == sum(r["token_usage"]["total_tokens"] for r in rows)

    by_model = run_cli("usage", "--store", f"json:{work}", "--workspace", "demo",
                       "--group-by", "model", "--format", "csv", env=env)
    lines = by_model.stdout.strip().splitlines()
    assert lines[0].startswith("key,documents,")
    assert {line.split(",")[0] for line in lines[1:]} == {
        "tokmeter-demo-extractor", "tokmeter-demo-hash-embedder"}

    table = run_cli("usage", "--store", f"json:{work}", "--workspace", "demo",
                    "--group-by", "day", env=env)
    assert table.returncode == 0 and "documents" in table.stdout.splitlines()[0]


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--store", "json:/definitely/not/here"], 3, "does not exist"),
    (["--store", "ftp://example"], 2, "unsupported store location"),
    (["--store", "json:{work}", "--workspace", "nobody"], 4, "no LightRAG doc-status data"),
    (["--store", "json:{work}", "--workspace", "../etc"], 2, "single path component"),
    (["--store", "json:{work}", "--since", "yesterday"], 2, "not an ISO date"),
])
def test_usage_command_errors_are_clear(tmp_path: Path, args: list[str], code: int,
                                        message: str) -> None:
    (tmp_path / "work").mkdir()
    args = [a.replace("{work}", str(tmp_path / "work")) for a in args]
    result = run_cli("usage", *args)
    assert result.returncode == code, (result.returncode, result.stderr)
    assert message in result.stderr


@pytest.mark.parametrize("store_kind", ["postgres", "mongo"])
def test_usage_command_on_database_stores(store_kind: str, tmp_path: Path) -> None:
    import uuid

    from tests.conftest import require_server

    location = require_server(store_kind)
    workspace = f"cli{uuid.uuid4().hex[:10]}"
    root = Path(__file__).resolve().parent.parent
    job = subprocess.run([sys.executable, "-m", "tests.ingest_job", store_kind,
                          str(tmp_path / "rag"), workspace], cwd=root, capture_output=True,
                         text=True, timeout=300, check=False)
    assert job.returncode == 0, job.stderr[-2000:]
    written = json.loads(job.stdout.strip().splitlines()[-1])
    extra = ["--database", os.environ.get("MONGO_DATABASE", "LightRAG")] \
        if store_kind == "mongo" else []

    listed = run_cli("usage", "--store", location, *extra, "--workspace", workspace,
                     "--track-id", written["track_id"], "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert {d["doc_id"]: d["token_usage"] for d in json.loads(listed.stdout)} == written["usage"]

    by_model = run_cli("usage", "--store", location, *extra, "--workspace", workspace,
                       "--group-by", "model", "--format", "json")
    rows = {r["key"]: r for r in json.loads(by_model.stdout)}
    assert rows["m"]["llm_input_tokens"] == sum(
        u["llm_input_tokens"] for u in written["usage"].values())
    assert rows["e"]["embedding_tokens"] == sum(
        u["embedding_tokens"] for u in written["usage"].values())

    unknown = run_cli("usage", "--store", location, *extra, "--workspace", workspace + "x")
    assert unknown.returncode == 4 and "no LightRAG doc-status data" in unknown.stderr


@pytest.mark.parametrize("location", ["postgresql://u:secret@127.0.0.1:1/db",
                                      "mongodb://127.0.0.1:1"])
def test_usage_command_reports_an_unreachable_database(location: str) -> None:
    result = run_cli("usage", "--store", location, "--workspace", "w", timeout=120)
    assert result.returncode == 3, result.stderr
    assert "secret" not in result.stderr  # no password in the message
