"""The conversation held in a session, with the original ChatStream prompt API.

``AbstractChatPrompt`` keeps the original's method names (``add_requester_msg``,
``add_responder_msg``, ``clear_last_responder_message``, ``create_prompt``...)
so that prompt classes written for the original keep working: a subclass that
overrides ``create_prompt`` renders its own format. ``ChatPrompt``, the
default, renders with the tokenizer's own chat template instead of a
hand-written format, so any chat model works without a prompt class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum, auto


class RoleType(Enum):
    REQUESTER = auto()
    RESPONDER = auto()
    UNKNOWN = auto()


class ChatContent:
    def __init__(self, role: str, msg: str | None = "", msg_id: str | None = None,
                 role_type: RoleType = RoleType.UNKNOWN):
        self.role = role
        self.role_type = role_type
        self.message = msg
        self.message_id = msg_id

    def get_role(self):
        return self.role

    def get_role_type(self):
        return self.role_type

    def get_message(self):
        return self.message

    def set_message(self, msg):
        self.message = msg

    def get_message_id(self):
        return self.message_id

    def set_message_id(self, message_id):
        self.message_id = message_id

    def to_dict(self) -> dict:
        return {"role": self.role, "role_type": self.role_type.name, "message": self.message,
                "message_id": self.message_id}

    @classmethod
    def from_dict(cls, data: dict) -> "ChatContent":
        return cls(data["role"], data["message"], data.get("message_id"), RoleType[data["role_type"]])


class AbstractChatPrompt(ABC):
    """History of one conversation: requester (user) and responder (model) turns."""

    def __init__(self):
        self.system = ""
        self.requester = "user"
        self.responder = "assistant"
        self.chat_contents: list[ChatContent] = []
        self.tokenizer = None
        # Turns left out of the prompt, oldest first, to fit the context (window.py): saved with the
        # conversation so that its window moves in jumps and its prompts keep a common beginning.
        self.window_start = 0

    # -- the original API ---------------------------------------------------------------
    def set_system(self, system: str):
        self.system = system

    def set_requester(self, requester: str):
        self.requester = requester

    def set_responder(self, responder: str):
        self.responder = responder

    def set_tokenizer(self, tokenizer):
        self.tokenizer = tokenizer

    def add_requester_msg(self, message, message_id=None):
        self.chat_contents.append(ChatContent(self.requester, message, message_id, RoleType.REQUESTER))

    def add_responder_msg(self, message, message_id=None):
        self.chat_contents.append(ChatContent(self.responder, message, message_id, RoleType.RESPONDER))

    def _last(self, role_type: RoleType) -> ChatContent | None:
        return next((c for c in reversed(self.chat_contents) if c.role_type == role_type), None)

    def get_requester_last_msg(self):
        last = self._last(RoleType.REQUESTER)
        return last.message if last else None

    def get_responder_last_msg(self):
        last = self._last(RoleType.RESPONDER)
        return last.message if last else None

    def set_responder_last_msg(self, message):
        last = self._last(RoleType.RESPONDER)
        if last is not None:
            last.message = message

    def set_responder_last_msg_id(self, message_id):
        last = self._last(RoleType.RESPONDER)
        if last is not None:
            last.message_id = message_id

    def clear_last_responder_message(self):
        """Forget the last answer (its slot stays, empty) so that it can be generated again."""
        self.set_responder_last_msg(None)

    def remove_last_requester_msg(self):
        last = self._last(RoleType.REQUESTER)
        if last is not None:
            self.chat_contents.remove(last)

    def remove_last_responder_msg(self):
        last = self._last(RoleType.RESPONDER)
        if last is not None:
            self.chat_contents.remove(last)

    def find_chat_content_by_message_id(self, message_id):
        return next((c for c in self.chat_contents if c.message_id == message_id), None)

    def is_empty(self) -> bool:
        return not self.chat_contents

    def clear_history(self):
        self.chat_contents = []
        self.window_start = 0

    def get_turn(self) -> int:
        return sum(1 for c in self.chat_contents if c.role_type == RoleType.REQUESTER)

    def get_contents(self, opts=None):
        return list(self.chat_contents)

    def get_stop_strs(self):
        """Extra stop strings for models whose end of answer is not their EOS token."""
        return None

    def build_initial_prompt(self, chat_prompt):
        """Hook called once when a session's prompt is created (set a system prompt here)."""

    def drop_oldest_turn(self) -> bool:
        """Remove the oldest requester/responder pair; False when only the last turn is left."""
        starts = [i for i, c in enumerate(self.chat_contents) if c.role_type == RoleType.REQUESTER]
        if len(starts) < 2:
            return False
        del self.chat_contents[: starts[1]]
        return True

    @abstractmethod
    def create_prompt(self, opts=None) -> str:
        """The text given to the model: history so far, ending where the responder speaks next."""

    # -- storage --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"system": self.system, "requester": self.requester, "responder": self.responder,
                "chat_contents": [c.to_dict() for c in self.chat_contents],
                "window_start": getattr(self, "window_start", 0)}

    @classmethod
    def from_dict(cls, data: dict) -> "AbstractChatPrompt":
        prompt = cls()
        prompt.system = data.get("system", "")
        prompt.requester = data.get("requester", prompt.requester)
        prompt.responder = data.get("responder", prompt.responder)
        prompt.chat_contents = [ChatContent.from_dict(c) for c in data.get("chat_contents", [])]
        start = data.get("window_start", 0)
        prompt.window_start = start if isinstance(start, int) and start >= 0 else 0
        return prompt


class ChatPrompt(AbstractChatPrompt):
    """Renders the conversation with the tokenizer's chat template."""

    def messages(self, upto_message_id=None) -> list[dict]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        for c in self.chat_contents:
            if c.message is None:
                break  # the answer still to be generated
            role = "user" if c.role_type == RoleType.REQUESTER else "assistant"
            out.append({"role": role, "content": c.message})
            if upto_message_id is not None and c.message_id == upto_message_id:
                break
        return out

    def create_prompt(self, opts=None) -> str:
        opts = opts or {}
        if self.tokenizer is None:
            raise RuntimeError("ChatPrompt needs a tokenizer: call set_tokenizer(tokenizer) first")
        messages = self.messages(opts.get("to_message_id"))
        pending = bool(self.chat_contents) and self.chat_contents[-1].message is None
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=pending)
