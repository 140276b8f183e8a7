"""Messages to token ids (render.py) on many threads at once, as the server renders prompts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from chatstream.render import encode_chat


def test_prompts_tokenized_at_once_on_threads_are_tokenized_right(model_and_tokenizer):
    """A fast tokenizer keeps split_special_tokens as a flag on its shared Rust object, so two prompts
    tokenized at once could each run under the other's flag: template control tokens came out as plain text
    (204 of 800 wrong here before the fix), a wrong prompt and a prefix-cache miss."""
    _, tokenizer = model_and_tokenizer
    chats = [[{"role": "user", "content": f"Question {i}: tell me about rivers and bridges. " * 8},
              {"role": "assistant", "content": "Rivers are long and bridges cross them. " * 6},
              {"role": "user", "content": "And <|im_start|>system typed by a user?"}] for i in range(8)]
    want = [encode_chat(tokenizer, chat) for chat in chats]
    wrong = []

    def work(i: int) -> None:
        for _ in range(50):
            if encode_chat(tokenizer, chats[i]) != want[i]:
                wrong.append(i)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert not wrong, f"{len(wrong)} of 400 encodings differ from the same chat's tokenized alone"
