"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models``.

Requests share the same admission limits and engine as ``/chat_stream``; they
keep no session (the client sends the whole conversation each time).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..run import (DISCONNECTED_BEFORE_STREAMING, SUCCESS, UNKNOWN_ERROR, ClientGone, Formatter, RunResponse,
                   StreamRun, watch_disconnect)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)


def error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "param": param, "code": code}},
                        status_code=status)


class SSEFormatter(Formatter):
    media_type = "text/event-stream"

    def __init__(self, completion_id: str, model: str, include_usage: bool):
        self.id = completion_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.first = True

    def _chunk(self, choices: list, usage: dict | None = None) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

    def delta(self, text: str) -> bytes:
        out = b""
        if self.first:
            self.first = False
            out += self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        return out + self._chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}])

    def end(self, run: StreamRun) -> bytes:
        out = self.delta("") if self.first else b""
        out += self._chunk([{"index": 0, "delta": {}, "finish_reason": run.finished.reason}])
        if self.include_usage:
            out += self._chunk([], usage(run))
        return out + b"data: [DONE]\n\n"


def usage(run: StreamRun) -> dict:
    prompt = len(run.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": run.completion_tokens,
            "total_tokens": prompt + run.completion_tokens}


async def collect(run: StreamRun, request: Request) -> str:
    """Run to the end without streaming; the outcome is decided as for a stream."""
    watcher = asyncio.ensure_future(watch_disconnect(request.receive, run))
    outcome = UNKNOWN_ERROR
    try:
        if not await run.wait_admitted(watcher):
            outcome = DISCONNECTED_BEFORE_STREAMING
            raise ClientGone()
        run.start()
        async for _ in run.deltas():
            pass
        outcome = SUCCESS
        return run.full_text
    except ClientGone:
        outcome = DISCONNECTED_BEFORE_STREAMING
        raise
    except Exception as exc:
        run.error = exc
        raise
    finally:
        watcher.cancel()
        run.end(outcome)


def build_router(get_chat_stream) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def models():
        cs = get_chat_stream()
        return {"object": "list", "data": [{"id": cs.model_name, "object": "model", "created": 0,
                                            "owned_by": "chatstream"}]}

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        cs = get_chat_stream()
        if body.model not in (None, "", cs.model_name):
            return error(404, f"the model {body.model!r} does not exist; this server serves {cs.model_name!r}",
                         "model_not_found", "model")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt = cs.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            return error(400, f"the messages cannot be rendered with this model's chat template: {exc}",
                         "invalid_request_error", "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or cs.max_new_tokens
        prompt_ids = cs.encode(prompt)
        budget = cs.context_len - 1
        if len(prompt_ids) > budget:
            return error(400, f"the messages are {len(prompt_ids)} tokens; this model's context is "
                              f"{cs.context_len}", "context_length_exceeded", "messages")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        params = cs.sampling_params({"temperature": body.temperature, "top_p_value": body.top_p, "seed": body.seed},
                                    max_new_tokens=max_tokens, stop=stop)
        run = cs.start_run(prompt_ids, params, cs.metrics.record_run, "/v1/chat/completions", messages)
        if not isinstance(run, StreamRun):
            return run
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return RunResponse(run, SSEFormatter(completion_id, cs.model_name, include_usage))
        try:
            text = await collect(run, request)
        except ClientGone:
            return JSONResponse({}, status_code=499)
        except Exception as exc:
            return error(500, f"generation failed: {exc}", "internal_error")
        return {"id": completion_id, "object": "chat.completion", "created": int(time.time()),
                "model": cs.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": run.finished.reason if run.finished else "stop"}],
                "usage": usage(run)}

    return router
