"""An OpenAI-compatible model server on loopback for the end-to-end API tests.

Run: ``python fake_openai_server.py PORT`` (binds 127.0.0.1 only).

* ``POST /v1/chat/completions``: plain and SSE streaming (a final usage chunk when
  ``stream_options.include_usage`` is set). Answers LightRAG's entity extraction with
  entities named after the document marker found in the request, so no two documents
  share an entity; gleaning gets no new entities; keyword extraction gets JSON.
* ``POST /v1/embeddings``: float or base64 vectors, with ``usage``.
* ``GET /_log``: every request served: its document markers, its ``usage`` and status.

Usage figures are real ``o200k_base`` counts of the request / response text, so the
tests can compare what LightRAG's openai binding reported to tokmeter with what this
server billed, document by document.

Document markers look like ``tmk`` + 10 hex digits (``tmq``: a query). A marker ``tmf...`` marks a
document that must fail: its first chat request is answered, every later one gets an
HTTP 500 (LightRAG's openai binding retries it, then the document fails).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import threading
import time
import uuid
from typing import Any

import numpy as np
import tiktoken
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MARKER = re.compile(r"tm[kfq][0-9a-f]{10}", re.IGNORECASE)
DIM = 64

ENC = tiktoken.get_encoding("o200k_base")
app = FastAPI()
LOG: list[dict[str, Any]] = []
_lock = threading.Lock()
_chat_seen: dict[str, int] = {}


def ntok(text: str) -> int:
    return len(ENC.encode_ordinary(text or ""))


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def markers_in(text: str) -> list[str]:
    return sorted({m.lower() for m in MARKER.findall(text)})


def extraction_reply(marker: str) -> str:
    person, company = f"Ada {marker}", f"Works {marker}"
    return (
        f"entity<|#|>{person}<|#|>person<|#|>{person} is an engineer named in document "
        f"{marker}.\n"
        f"entity<|#|>{company}<|#|>organization<|#|>{company} is the company of document "
        f"{marker}.\n"
        f"relation<|#|>{person}<|#|>{company}<|#|>employment<|#|>{person} works at "
        f"{company}.\n"
        "<|COMPLETE|>"
    )


def pick_reply(body: dict[str, Any], text: str, marks: list[str]) -> str:
    if "high_level_keywords" in text or "low_level_keywords" in text:
        return json.dumps({"high_level_keywords": ["engineering"],
                           "low_level_keywords": ["Ada", "Works"]})
    messages = body.get("messages", [])
    if "<|#|>" in text and "entity" in text.lower():
        if len(messages) > 2:  # gleaning: the first answer is in the history
            return "<|COMPLETE|>"
        return extraction_reply(marks[0] if marks else "tmk0000000000")
    if marks:
        return f"Summary for document {marks[0]}."
    return "Ada works at Works."


def log(entry: dict[str, Any]) -> None:
    entry["t"] = time.time()
    with _lock:
        LOG.append(entry)


@app.get("/v1/models")
async def models() -> dict[str, Any]:
    return {"object": "list", "data": [{"id": "fake-chat", "object": "model"}]}


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Any:
    body = await request.json()
    messages = body.get("messages", [])
    text = "\n".join(message_text(m) for m in messages)
    marks = markers_in(text)
    stream = bool(body.get("stream"))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    failing = [m for m in marks if m.startswith("tmf")]
    if failing:
        with _lock:
            seen = _chat_seen.get(failing[0], 0)
            _chat_seen[failing[0]] = seen + 1
        if seen >= 1:
            log({"kind": "chat", "markers": marks, "status": 500, "usage": None,
                 "stream": stream, "include_usage": include_usage})
            return JSONResponse(
                {"error": {"message": "simulated provider failure", "type": "server_error"}},
                status_code=500,
            )
    reply = pick_reply(body, text, marks)
    prompt_tokens = sum(ntok(message_text(m)) for m in messages)
    completion_tokens = ntok(reply)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    log({"kind": "chat", "markers": marks, "status": 200, "usage": usage, "stream": stream,
         "include_usage": include_usage})
    cid = "chatcmpl-" + uuid.uuid4().hex[:12]
    created = int(time.time())
    model = body.get("model", "fake-chat")
    if not stream:
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": reply}}],
            "usage": usage,
        }

    async def events() -> Any:
        words = reply.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": created,
                     "model": model,
                     "choices": [{"index": 0, "delta": {"content": piece},
                                  "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        last = {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield f"data: {json.dumps(last)}\n\n"
        if include_usage:  # OpenAI: one more chunk, no choices, the usage
            final = {"id": cid, "object": "chat.completion.chunk", "created": created,
                     "model": model, "choices": [], "usage": usage}
            yield f"data: {json.dumps(final)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def vector(text: str, dim: int) -> np.ndarray:
    # Bag of hashed words: texts sharing words are similar, so queries find context.
    v = np.zeros(dim, dtype=np.float32)
    for word in re.findall(r"\w+", text.lower()):
        v[int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little") % dim] += 1.0
    norm = float(np.linalg.norm(v))
    return v / norm if norm else np.full(dim, 1.0 / np.sqrt(dim), dtype=np.float32)


@app.post("/v1/embeddings")
async def embeddings(request: Request) -> Any:
    body = await request.json()
    inputs = body["input"]
    if isinstance(inputs, str):
        inputs = [inputs]
    dim = int(body.get("dimensions") or DIM)
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    texts = []
    for i, text in enumerate(inputs):
        v = vector(text, dim)
        emb: Any = base64.b64encode(v.tobytes()).decode() if as_base64 else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
        marks = markers_in(text)
        texts.append({"marker": marks[0] if marks else None, "tokens": ntok(text)})
    total = sum(t["tokens"] for t in texts)
    usage = {"prompt_tokens": total, "total_tokens": total}
    log({"kind": "embedding", "texts": texts, "status": 200, "usage": usage})
    return {"object": "list", "data": data, "model": body.get("model"), "usage": usage}


@app.get("/_log")
async def read_log() -> Any:
    with _lock:
        return JSONResponse(list(LOG))


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
