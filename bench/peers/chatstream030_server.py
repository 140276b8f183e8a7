"""ChatStream 0.3.0 (from PyPI) serving the benchmark's model, set up as its README shows.

Runs inside bench/.peers/chatstream030 (made by bench/setup_peers.sh), never in the
project venv: this file imports the PyPI ``chatstream`` package, not this project's.

    python chatstream030_server.py --model DIR --port 18002 [--concurrency 8]

The prompt is rendered with the tokenizer's own chat template (the same template the
project's server and ``transformers serve`` use), so every peer sees identical prompt
tokens. Sampling is greedy (temperature 0: ChatStream's TemperatureProcessor takes the
argmax below 1e-4).
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI, Request
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatstream import AbstractChatPrompt, ChatStream

_TOKENIZER = None  # set in main(); prompts render with its chat template


class ChatPrompt(AbstractChatPrompt):
    """Renders the conversation with the tokenizer's chat template."""

    def __init__(self):
        super().__init__()
        self.set_requester("user")
        self.set_responder("assistant")

    def get_stop_strs(self):
        return None  # generation stops on the tokenizer's EOS token (<|im_end|>)

    def build_initial_prompt(self, chat_prompt):
        pass  # no system message of our own: the template adds its default one, as for the other peers

    def create_prompt(self, opts={}):
        messages, add_generation_prompt = [], False
        for content in self.get_contents(opts):
            role = "user" if content.get_role() == self.requester else "assistant"
            message = content.get_message()
            if message is None:
                add_generation_prompt = role == "assistant"
                continue
            messages.append({"role": role, "content": message})
        return _TOKENIZER.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def main() -> None:
    global _TOKENIZER
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory (safetensors)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18002)
    ap.add_argument("--concurrency", type=int, default=8, help="num_of_concurrent_executions")
    ap.add_argument("--max-queue", type=int, default=64, help="max_queue_size")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args()

    device = "cpu"
    _TOKENIZER = tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.to(device)
    model.eval()

    chat_stream = ChatStream(
        num_of_concurrent_executions=args.concurrency,
        max_queue_size=args.max_queue,
        model=model,
        tokenizer=tokenizer,
        device=device,
        chat_prompt_clazz=ChatPrompt,
        max_new_tokens=args.max_new_tokens,
        context_len=2048,
        temperature=0.0,
        top_k=None,
        top_p=None,
        repetition_penalty=None,
    )

    app = FastAPI()
    chat_stream.append_middlewares(app)

    @app.post("/chat_stream")
    async def stream_api(request: Request):
        return await chat_stream.handle_chat_stream_request(request)

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.on_event("startup")
    async def startup():
        await chat_stream.start_queue_worker()

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
