"""Reading a JSON request body with the limits a hostile client cannot get around.

Bounded in size (``MAX_BODY_BYTES``, checked on the header and while reading),
in nesting depth (``json`` raises ``RecursionError`` on deep nesting; a 400
here), and in encoding: the body must be UTF-8 and its strings must be
encodable as UTF-8 (a JSON escape like ``"\\ud800"`` makes a lone surrogate
that would fail later, inside the tokenizer or the session store).
"""

from __future__ import annotations

import json

from starlette.requests import ClientDisconnect, Request

from ..errors import ChatStreamError, bad_request

MAX_BODY_BYTES = 1 << 20


def too_large(size: int | None = None) -> ChatStreamError:
    said = f"request body is {size} bytes; " if size else "request body "
    return ChatStreamError(413, f"{said}the limit is {MAX_BODY_BYTES} bytes", "invalid_request_error",
                           code="request_too_large")


async def read_bytes(request: Request) -> bytes:
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise bad_request("the Content-Length header is not a number") from None
    if declared > MAX_BODY_BYTES:
        raise too_large(declared)
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > MAX_BODY_BYTES:
                raise too_large()
            chunks.append(chunk)
    except ClientDisconnect:
        raise ChatStreamError(400, "the client disconnected while sending the body", code="client_disconnected") \
            from None
    body = b"".join(chunks)
    request._body = body  # later request.body()/json() calls still work
    return body


def parse(body) -> object:
    """JSON from bytes or text (a dict or list passes through), with every string valid UTF-8."""
    if isinstance(body, (dict, list)):
        data = body
    else:
        if isinstance(body, str):
            try:
                body = body.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request("request body is not valid UTF-8") from None
        if len(body) > MAX_BODY_BYTES:
            raise too_large(len(body))
        try:
            data = json.loads(body)
        except RecursionError:
            raise bad_request("request body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad_request(f"request body is not valid JSON: {exc}") from None
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("request body contains text that is not valid Unicode (a lone surrogate)") from None
    except (RecursionError, ValueError, TypeError):
        raise bad_request("request body is nested too deeply or is not plain JSON") from None
    return data


async def read_json(request: Request, body=None) -> object:
    """The request's JSON body (``body`` when the application already read it)."""
    return parse(await read_bytes(request) if body is None else body)
