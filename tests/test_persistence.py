"""Usage written by one process is read back unchanged by a fresh process after the
database server was restarted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_server

ROOT = Path(__file__).resolve().parent.parent


def run_python(*args: str) -> Any:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("store_kind", ["json", "postgres", "mongo"])
def test_usage_survives_a_server_restart(store_kind: str, tmp_path: Path, workspace: str) -> None:
    if store_kind != "json":
        require_server(store_kind)
    written = run_python("-m", "tests.ingest_job", store_kind, str(tmp_path / "rag"), workspace)
    assert len(written["usage"]) == 4
    assert all(u and u["total_tokens"] > 0 for u in written["usage"].values())

    if store_kind != "json":
        target = "restart-pg" if store_kind == "postgres" else "restart-mongo"
        restart = subprocess.run(["bash", str(ROOT / "scripts" / "services.sh"), target],
                                 capture_output=True, text=True, timeout=180, check=False,
                                 env=dict(os.environ))
        assert restart.returncode == 0, restart.stderr[-2000:]

    read = run_python(
        "-c",
        "import asyncio, json, sys\n"
        "from tests.reopen import read_track\n"
        "print(json.dumps(asyncio.run(read_track(*sys.argv[1:]))))\n",
        store_kind, str(tmp_path / "rag"), workspace, written["track_id"])
    assert read == written["usage"]
