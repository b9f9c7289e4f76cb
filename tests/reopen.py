"""Read a track's usage in a fresh process, as a billing job would (used by tests)."""

from __future__ import annotations

import os
from typing import Any

from tokmeter.backends import open_store


async def read_track(kind: str, working_dir: str, workspace: str, track_id: str) -> dict[str, Any]:
    if kind == "json":
        location = f"json:{working_dir}"
        options: dict[str, Any] = {}
    elif kind == "postgres":
        location = os.environ["TOKMETER_TEST_POSTGRES_DSN"]
        options = {}
    else:
        location = os.environ["TOKMETER_TEST_MONGO_URI"]
        options = {"database": os.environ.get("MONGO_DATABASE", "LightRAG")}
    async with open_store(location, workspace=workspace, **options) as store:
        docs = await store.usage_for_track(track_id)
    return {d.doc_id: d.usage.to_dict() if d.usage else None for d in docs}
