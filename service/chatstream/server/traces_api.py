"""Recent stream traces from the in-memory store: ``/api/traces`` (JSON) and ``/traces`` (a page)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..errors import ChatStreamError
from ..telemetry import OUTCOME, TTFT
from .responses import error_response

PAGE = Path(__file__).parent / "static" / "traces.html"


def summarize(trace: dict) -> dict | None:
    """One line of the stream list, from a trace's spans; None for traces with no stream in them."""
    spans = trace["spans"]
    chat = next((s for s in spans if s["attributes"].get("gen_ai.operation.name") == "chat"), None)
    if chat is None:
        return None
    attrs = chat["attributes"]
    by_name = {s["name"]: s for s in spans if s["parent_id"] == chat["span_id"]}
    queue = by_name.get("chatstream.queue")
    ttft = attrs.get(TTFT)
    return {
        "trace_id": trace["trace_id"],
        "start_ns": chat["start_ns"],
        "endpoint": attrs.get("chatstream.endpoint"),
        "model": attrs.get("gen_ai.request.model"),
        "outcome": attrs.get(OUTCOME),
        "input_tokens": attrs.get("gen_ai.usage.input_tokens"),
        "output_tokens": attrs.get("gen_ai.usage.output_tokens"),
        "queue_wait_ms": queue["duration_ms"] if queue else None,
        "ttft_ms": ttft * 1000 if ttft is not None else None,
        "duration_ms": chat["duration_ms"],
        "status": chat["status"],
    }


def build_router(get_chat_stream) -> APIRouter:
    router = APIRouter()

    @router.get("/api/traces")
    async def traces(limit: int = 100, trace_id: str | None = None):
        store = get_chat_stream().telemetry.store
        out = []
        for trace in store.traces():
            if trace_id and trace["trace_id"] != trace_id:
                continue
            summary = summarize(trace)
            if summary is None:
                continue
            out.append({**trace, "summary": summary})
            if len(out) >= limit:
                break
        if trace_id and not out:
            return error_response(ChatStreamError(404, f"no trace {trace_id} in memory", "not_found"))
        return {"traces": out}

    @router.get("/traces")
    async def page():
        return FileResponse(PAGE)

    return router
