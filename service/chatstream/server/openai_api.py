"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models``: a translation, nothing more.

The request becomes a prompt and sampling parameters; the stream, its
admission limits and its outcome are the library's (lifecycle.py). Requests
keep no session: the client sends the whole conversation each time. Fields
this server cannot honour are refused with a 400 rather than ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from ..errors import ChatStreamError, bad_request, describe
from ..lifecycle import Stream
from ..render import ControlTextError, encode_chat
from .request_body import read_json
from ..window import check_fits
from .responses import Formatter, StreamResponse

# field -> the values meaning "not used"; anything else is refused. As vLLM without a tool parser: no tools, an
# empty list of them (some clients send one with no tools bound), and tool_choice "none" are served; a tool to
# call is refused, since the model's answer would never call it.
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "logprobs": (None, False),
    "top_logprobs": None, "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "audio": None, "modalities": (None, ["text"]), "prediction": None,
}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ResponseFormat(BaseModel):
    type: Literal["text"]


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=1024)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    response_format: ResponseFormat | None = None
    user: str | None = None


def parse_request(data) -> ChatCompletionRequest:
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    for name, unused in UNSUPPORTED.items():
        value = data.get(name)
        allowed = unused if isinstance(unused, tuple) else (unused,)
        if value not in allowed:
            raise bad_request(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    fmt = data.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad_request("only response_format {\"type\": \"text\"} is supported", "response_format",
                          "unsupported_parameter")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise bad_request(describe(exc.errors())) from None


class SSEFormatter(Formatter):
    media_type = "text/event-stream"

    def __init__(self, completion_id: str, model: str, include_usage: bool):
        self.id = completion_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.first = True

    def _event(self, body: dict) -> bytes:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

    def _chunk(self, choices: list, usage: dict | None = None) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return self._event(body)

    def delta(self, text: str) -> bytes:
        out = b""
        if self.first:
            self.first = False
            out += self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        return out + self._chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}])

    def end(self, stream: Stream) -> bytes:
        out = self.delta("") if self.first else b""
        out += self._chunk([{"index": 0, "delta": {}, "finish_reason": stream.timeline.finish_reason}])
        if self.include_usage:
            out += self._chunk([], usage(stream))
        return out + b"data: [DONE]\n\n"

    def failed(self, error: ChatStreamError) -> bytes:
        # What vLLM does: an error event, which the openai client raises as an APIError.
        return self._event(error.body()) + b"data: [DONE]\n\n"


class CompletionFormatter(Formatter):
    """Not streamed: the whole answer in one JSON body at the end."""

    media_type = "application/json"

    def __init__(self, completion_id: str, model: str):
        self.id = completion_id
        self.model = model

    def delta(self, text: str) -> None:
        return None

    def end(self, stream: Stream) -> bytes:
        return json.dumps({
            "id": self.id, "object": "chat.completion", "created": int(time.time()), "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(stream.text)},
                         "finish_reason": stream.timeline.finish_reason or "stop"}],
            "usage": usage(stream)}, ensure_ascii=False).encode()


def usage(stream: Stream) -> dict:
    t = stream.timeline
    return {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
            "total_tokens": t.prompt_tokens + t.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": t.cached_prompt_tokens}}


def model_card(cs) -> dict:
    return {"id": cs.model_name, "object": "model", "created": 0, "owned_by": "chatstream"}


def unknown_model(name: str, served: str) -> ChatStreamError:
    return ChatStreamError(404, f"the model {name!r} does not exist; this server serves {served!r}",
                           "invalid_request_error", "model", "model_not_found")


def build_router(get_chat_stream) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(get_chat_stream())]}

    @router.get("/v1/models/{model_id:path}")  # a hub id has a slash (the openai client sends it as %2F)
    async def model(model_id: str):
        cs = get_chat_stream()
        if model_id != cs.model_name:
            raise unknown_model(model_id, cs.model_name)
        return model_card(cs)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        cs = get_chat_stream()
        body = parse_request(await read_json(request))
        if body.model not in (None, "", cs.model_name):
            raise unknown_model(body.model, cs.model_name)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt_ids = await anyio.to_thread.run_sync(encode_chat, cs.tokenizer, messages)
        except ControlTextError as exc:
            raise bad_request(str(exc), "messages") from None
        except Exception as exc:
            raise bad_request(f"the messages cannot be rendered with this model's chat template: {exc}",
                              "messages") from None
        # The client owns this history: nothing is left out of it (docs/sessions.md says why); the answer
        # may use what the prompt leaves of the context.
        check_fits(prompt_ids, cs.prompt_limit(), "messages")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        params = cs.sampling_params({"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed},
                                    max_new_tokens=body.max_completion_tokens or body.max_tokens, stop=stop)
        stream = cs.open_stream(prompt_ids, params, "/v1/chat/completions", messages, cs.observe)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamResponse(stream, SSEFormatter(completion_id, cs.model_name, include_usage))
        return StreamResponse(stream, CompletionFormatter(completion_id, cs.model_name))

    return router
