"""Ingest a few documents with scripted models in a fresh process (used by tests).

    python -m tests.ingest_job STORE_KIND WORKING_DIR WORKSPACE
prints {"track_id": ..., "usage": {doc_id: token_usage}} as the last line.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import tokmeter
from tests.conftest import lightrag_store_kwargs
from tests.scripted import EMBEDDING_DIM, ScriptedModels, document_text, marker


async def ingest(kind: str, working_dir: str, workspace: str) -> dict[str, Any]:
    from lightrag import LightRAG
    from lightrag.utils import EmbeddingFunc

    models = ScriptedModels()
    rag = LightRAG(
        working_dir=working_dir, workspace=workspace,
        llm_model_func=tokmeter.metered("llm", model="m", encoding="o200k_base")(models.llm),
        embedding_func=EmbeddingFunc(
            embedding_dim=EMBEDDING_DIM,
            func=tokmeter.metered("embedding", model="e", encoding="o200k_base")(models.embed)),
        max_parallel_insert=4, chunk_token_size=120, chunk_overlap_token_size=10,
        **lightrag_store_kwargs(kind),
    )
    tokmeter.instrument(rag)
    await rag.initialize_storages()
    try:
        track_id = await rag.ainsert([document_text(i, 3 + i) for i in range(4)],
                                     ids=[marker(i) for i in range(4)])
        docs = await rag.aget_docs_by_track_id(track_id)
        return {"track_id": track_id,
                "usage": {k: v.metadata.get("token_usage") for k, v in docs.items()}}
    finally:
        await rag.finalize_storages()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(ingest(*sys.argv[1:4]))))
