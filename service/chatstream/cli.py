"""The ``chatstream`` command: ``serve`` and ``prepare-model``."""

from __future__ import annotations

import argparse
import logging
import sys

from . import envvars
from .config import Settings


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the chat server",
                       description="Run the ChatStream server. Every flag can also be set with the environment "
                                   "variable shown; a flag wins over its variable.")
    opt = p.add_argument
    opt("--model", help=f"model source: builtin:smollm2-135m-instruct (default), hf:ORG/NAME[@revision], a model "
                        f"directory or a .gguf file [{envvars.MODEL}]")
    opt("--revision", help=f"hub revision for hf: sources [{envvars.REVISION}]")
    opt("--served-model-name", help=f"model name reported by /v1/models [{envvars.SERVED_MODEL_NAME}]")
    opt("--host", help=f"address to listen on, default 127.0.0.1 [{envvars.HOST}]")
    opt("--port", type=int, help=f"port to listen on, default 8000 [{envvars.PORT}]")
    opt("--max-concurrent", type=int, help=f"generations decoding at once (num_of_concurrent_executions), "
                                           f"default 8 [{envvars.MAX_CONCURRENT}]")
    opt("--max-queue", type=int, help=f"requests allowed to wait for a slot (max_queue_size); beyond it the server "
                                      f"answers 503 with Retry-After, default 32 [{envvars.MAX_QUEUE}]")
    opt("--max-new-tokens", type=int, help=f"most tokens generated per answer, default 256 [{envvars.MAX_NEW_TOKENS}]")
    opt("--context-length", type=int, help=f"tokens of prompt plus answer; older turns are dropped to fit, "
                                           f"default 2048 [{envvars.CONTEXT_LENGTH}]")
    opt("--device", help=f"auto (CUDA when present), cpu or cuda [{envvars.DEVICE}]")
    opt("--dtype", help=f"auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16 [{envvars.DTYPE}]")
    opt("--cpu-linear", choices=("onednn", "torch"),
        help=f"linear layers on the CPU: onednn (weights prepacked once, the default) or torch (PyTorch's own "
             f"kernel) [{envvars.CPU_LINEAR}]")
    opt("--threads", type=int, help=f"CPU threads for the model; 0 (default) uses the schedulable CPUs, capped by "
                                    f"the container's CPU limit [{envvars.THREADS}]")
    opt("--temperature", type=float, help="default sampling temperature; 0 is greedy (default 0.7)")
    opt("--top-p", type=float, help="default nucleus sampling threshold (default 0.9)")
    opt("--queue-full-status", type=int, choices=(429, 503),
        help=f"status when the queue is full, default 503 [{envvars.QUEUE_FULL_STATUS}]")
    opt("--session-store", choices=("memory", "redis"), help=f"where sessions live [{envvars.SESSION_STORE}]")
    opt("--redis-url", help=f"Redis URL for the redis session store [{envvars.REDIS_URL}]")
    opt("--shutdown-grace-seconds", type=float, help=f"how long SIGTERM waits for streams in flight, default 30 "
                                                     f"[{envvars.SHUTDOWN_GRACE_SECONDS}]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatstream", description="Streaming chat server for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    prep = sub.add_parser("prepare-model", help="convert the builtin model once (shows progress)",
                          description="Convert the builtin GGUF model to safetensors in the cache directory "
                                      f"[{envvars.CACHE_DIR}], so that the server starts in seconds.")
    prep.add_argument("--model", default="builtin:smollm2-135m-instruct")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from .engine.loader import ModelLoadError
    if args.command == "prepare-model":
        from .engine.loader import parse_source, prepare_builtin
        try:
            source = parse_source(args.model)
            if source.kind != "builtin":
                print(f"nothing to prepare for {args.model}: only builtin models are converted")
                return 0
            print(f"model ready in {prepare_builtin(source.location)}")
        except ModelLoadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0

    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    settings = Settings.from_env(**overrides)
    from .engine.loader import parse_source
    try:
        parse_source(settings.model, settings.revision)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .server.runner import serve
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
