"""A chat turn in a session: one at a time, fitted without editing the history, settled when its stream ends.

- One turn per session at a time: a second request while one is being
  answered gets 409 (two tabs, a double click), so every answer follows its
  own question. The lock lives in this process; with several replicas the
  router keeps a session on one pod (docs/failure-semantics.md).
- The prompt is rendered and tokenized off the event loop, on a copy of the
  conversation with the turn added: when the oldest turns must be left out to
  fit the context, they are left out of the prompt only, never deleted from
  the history, in jumps that keep the next turns' prompts on one cached
  beginning (window.py); a turn that cannot fit is refused with the history
  untouched.
- The turn is applied to the session's conversation only once it fits, and
  settled by the stream's summary: an answer that reached the client (fully or
  in part) is kept, anything else is taken back.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from typing import Callable

import anyio

from . import window
from .errors import ChatStreamError, bad_request
from .lifecycle import DISCONNECTED_WHILE_STREAMING, SUCCESS, Summary
from .prompt import ChatPrompt
from .render import ControlTextError, encode_chat, encode_text


@dataclass
class Turn:
    window: window.Window
    messages: list[dict] | None
    stop: list[str] | None
    message_id: str
    chat_prompt: object
    session_mgr: object
    undo: Callable[[], None]
    release: Callable[[], None]
    kept: bool = False
    settled: bool = False

    @property
    def prompt_ids(self) -> list[int]:
        return self.window.ids

    def keep(self, text: str) -> None:
        """The whole answer is in, its end not yet sent: the conversation holds it (the session then saves it)."""
        if not self.kept:
            self.kept = True
            self.chat_prompt.set_responder_last_msg(text)

    def settle(self, summary: Summary) -> None:
        """The stream ended: keep an answer that reached the client (fully or in part), take back the rest."""
        if self.settled:
            return
        self.settled = True
        try:
            if summary.outcome in (SUCCESS, DISCONNECTED_WHILE_STREAMING) or summary.streamed:
                self.chat_prompt.set_responder_last_msg(summary.text)
            else:
                self.undo()
            if self.session_mgr is not None:
                self.session_mgr.save_session()
        finally:
            self.release()


class Turns:
    def __init__(self, tokenizer, new_prompt: Callable[[], object], prompt_budget: int, window_keep: float):
        self.tokenizer = tokenizer
        self.new_prompt = new_prompt
        self.prompt_budget = prompt_budget
        self.window_keep = window_keep
        self.busy: set[str] = set()

    async def begin(self, session_mgr, user_input: str | None, regenerate: bool) -> Turn:
        key = getattr(session_mgr, "session_id", None)
        if key is not None:
            if key in self.busy:
                raise ChatStreamError(409, "this conversation is already being answered; send the next turn when "
                                           "the answer has ended", "conflict", code="turn_in_progress")
            self.busy.add(key)
        release = (lambda: self.busy.discard(key)) if key is not None else (lambda: None)
        try:
            chat_prompt = self._session_prompt(session_mgr)
            candidate = copy.copy(chat_prompt)
            candidate.chat_contents = [copy.copy(c) for c in chat_prompt.chat_contents]
            _apply(candidate, user_input, regenerate)
            start = getattr(chat_prompt, "window_start", 0)
            fitted, messages = await anyio.to_thread.run_sync(self._fit, candidate, start)
            undo = _apply(chat_prompt, user_input, regenerate)
        except BaseException:
            release()
            raise
        chat_prompt.window_start = fitted.start
        message_id = str(uuid.uuid4())
        chat_prompt.set_responder_last_msg_id(message_id)

        def undo_turn():
            undo()
            chat_prompt.window_start = start
        return Turn(fitted, messages, chat_prompt.get_stop_strs(), message_id, chat_prompt, session_mgr, undo_turn,
                    release)

    def _session_prompt(self, session_mgr):
        if session_mgr is None:
            return self.new_prompt()
        session = session_mgr.get_session()
        prompt = session.get("chat_prompt")
        if prompt is None:
            prompt = self.new_prompt()
            session["chat_prompt"] = prompt
        if getattr(prompt, "tokenizer", None) is None:
            prompt.set_tokenizer(self.tokenizer)
        return prompt

    def _fit(self, prompt, start: int) -> tuple[window.Window, list[dict] | None]:
        """The prompt's token ids, its oldest whole turns left out as window.fit decides (on this copy only)."""
        try:
            if isinstance(prompt, ChatPrompt) and type(prompt).create_prompt is ChatPrompt.create_prompt:
                return self._fit_messages(prompt, start)
            return window.fit(lambda s: self._render_text(prompt, s), max(1, prompt.get_turn()),
                              self.prompt_budget, self.window_keep, start), None
        except ControlTextError as exc:
            raise bad_request(str(exc), "user_input") from None

    def _render_text(self, prompt, left_out: int) -> list[int]:
        """A prompt class's own rendering, with its ``drop_oldest_turn`` applied ``left_out`` times."""
        view = copy.copy(prompt)
        view.chat_contents = list(prompt.chat_contents)
        for _ in range(left_out):
            if not view.drop_oldest_turn():
                break
        return encode_text(self.tokenizer, view.create_prompt(), control=True)

    def _fit_messages(self, prompt: ChatPrompt, start: int):
        messages = prompt.messages()
        pending = bool(prompt.chat_contents) and prompt.chat_contents[-1].message is None
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        rest = messages[len(head):]
        # A turn starts at each user message (an opening assistant message belongs to the first turn).
        starts = [0] + [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]

        def render(left_out: int) -> list[int]:
            return encode_chat(self.tokenizer, head + rest[starts[left_out]:], add_generation_prompt=pending)

        fitted = window.fit(render, len(starts), self.prompt_budget, self.window_keep, start)
        return fitted, head + rest[starts[fitted.start]:]


def _apply(chat_prompt, user_input: str | None, regenerate: bool) -> Callable[[], None]:
    """Add the turn to the conversation; return a function that takes it back."""
    if regenerate:
        if chat_prompt.is_empty() or chat_prompt.get_responder_last_msg() is None:
            raise bad_request("nothing to regenerate: the conversation has no answer yet", "regenerate")
        previous = chat_prompt.get_responder_last_msg()
        chat_prompt.clear_last_responder_message()
        return lambda: chat_prompt.set_responder_last_msg(previous)
    chat_prompt.add_requester_msg(user_input)
    chat_prompt.add_responder_msg(None)

    def undo():
        chat_prompt.remove_last_responder_msg()
        chat_prompt.remove_last_requester_msg()
    return undo
