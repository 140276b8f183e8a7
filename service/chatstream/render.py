"""Messages to token ids, with what users typed kept as text.

A chat template's control tokens (``<|im_start|>``...) are written as text in
the rendered prompt, and a plain tokenizer call parses every occurrence as the
control token, including ones a user typed, which lets a user forge a system
turn. Here the template is rendered with a placeholder for each message's
content; the template's own text is tokenized with its special tokens, and
each message's content with ``split_special_tokens=True``, so typed control
strings stay ordinary text. A template that does not keep the placeholders
intact is rendered for real instead, and then a content holding a control
string is refused (``ControlTextError``), since it could not be kept apart.

Prompts are tokenized on worker threads, several at once, and a fast
tokenizer keeps ``split_special_tokens`` as a flag on its one shared Rust
object, set before each call: two calls at once could each run under the
other's flag, and a template's control tokens came out as plain text (a wrong
prompt, and a prefix-cache miss). So tokenizer calls here take turns.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("chatstream")

_TOKENIZING = threading.Lock()  # one tokenizer call at a time (the flag above); a call takes about a millisecond

_OPEN, _CLOSE = "\ue000", "\ue001"  # Unicode private-use characters: no template writes them


class ControlTextError(ValueError):
    pass


def encode_text(tokenizer, text: str, control: bool) -> list[int]:
    """Tokens of ``text``; ``control`` False keeps special-token strings as plain text."""
    if not text:
        return []
    with _TOKENIZING:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=not control)["input_ids"]


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    marks = [f"{_OPEN}{i}{_CLOSE}" for i in range(len(messages))]
    shaped = [{**m, "content": mark} for m, mark in zip(messages, marks)]
    text = tokenizer.apply_chat_template(shaped, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids: list[int] = []
    pos = 0
    for message, mark in zip(messages, marks):
        at = text.find(mark, pos)
        if at < 0:
            break
        ids += encode_text(tokenizer, text[pos:at], control=True)
        ids += encode_text(tokenizer, message["content"], control=False)
        pos = at + len(mark)
    else:
        return ids + encode_text(tokenizer, text[pos:], control=True)
    # The template changed or dropped a placeholder: render for real and refuse control strings in contents.
    log.debug("chat template does not keep message placeholders; tokenizing the whole prompt")
    for message in messages:
        if has_control_text(tokenizer, message["content"]):
            raise ControlTextError("a message contains one of the model's control tokens as text")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return encode_text(tokenizer, text, control=True)


def has_control_text(tokenizer, text: str) -> bool:
    """Whether ``text`` contains a special token's string (used where contents cannot be kept apart)."""
    return any(tok in text for tok in tokenizer.all_special_tokens if tok)
