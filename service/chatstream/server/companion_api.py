"""The original ChatStream's companion endpoints, added by ``append_apis``."""

from __future__ import annotations

from fastapi import FastAPI, Request

from ..errors import ChatStreamError, bad_request
from ..stream import ORIGINAL_NAMES
from .request_body import read_json
from .responses import error_response

LIMITS = {"temperature": (0.0, 2.0), "top_k_value": (0, 500), "top_p_value": (0.0, 1.0)}


def _session(request: Request):
    manager = getattr(request.state, "session", None)
    return manager.get_session() if manager is not None else None


def _check_params(data) -> dict:
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    params = {}
    for key, (low, high) in LIMITS.items():
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise bad_request(f"{key} must be a number from {low} to {high}", key)
        params[key] = value
    if params.get("top_p_value") == 0:
        raise bad_request("top_p_value must be above 0", "top_p_value")
    return params


def add_companion_routes(app: FastAPI, get_chat_stream) -> None:
    """``get_chat_stream()`` returns the ChatStream (or raises a 503 ChatStreamError while loading)."""
    taken = {getattr(route, "path", None) for route in app.router.routes}
    if "/chat_stream" not in taken:  # the application's own endpoint wins
        @app.post("/chat_stream")
        async def chat_stream_api(request: Request):
            return await get_chat_stream().handle_chat_stream_request(request)

    @app.post("/clear_context")
    async def clear_context(request: Request):
        session = _session(request)
        if session is None:
            return {"success": False, "message": "no session"}
        session.pop("chat_prompt", None)
        return {"success": True, "message": "Context successfully cleared"}

    @app.get("/get_load")
    async def get_load():
        return {"success": True, "message": "success", "chatstream_workers": [get_chat_stream().get_load()]}

    @app.get("/get_prompt")
    async def get_prompt(request: Request):
        session = _session(request)
        prompt = session.get("chat_prompt") if session else None
        if prompt is not None and getattr(prompt, "tokenizer", None) is None:
            prompt.set_tokenizer(get_chat_stream().tokenizer)  # a prompt loaded from a shared store
        return {"success": True, "message": "success" if prompt else "no prompt",
                "prompt": prompt.create_prompt() if prompt and not prompt.is_empty() else None}

    @app.post("/set_generation_params")
    async def set_generation_params(request: Request):
        try:
            params = _check_params(await read_json(request))
        except ChatStreamError as err:
            return error_response(err)
        return _generation_params(get_chat_stream(), _session(request), params)

    @app.get("/get_generation_params")
    async def get_generation_params(request: Request):
        return _generation_params(get_chat_stream(), _session(request), {})


def _generation_params(chat_stream, session: dict | None, update: dict) -> dict:
    """The session's parameters after ``update``, over the server's defaults (the original's names)."""
    if session is None:
        return {"success": False, "message": "no session", "generation_params": None}
    if update:  # an empty update must not create a session
        session["generation_params"] = {**session.get("generation_params", {}), **update}
    base = {original: chat_stream.defaults[name] for original, name in ORIGINAL_NAMES.items()}
    merged = {**base, **(session.get("generation_params") or {})}
    return {"success": True, "message": "success", "generation_params": merged}
