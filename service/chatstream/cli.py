"""The ``chatstream`` command: ``serve`` and ``prepare-model``.

The ``serve`` flags are generated from the settings table (settings.py), so
every flag has its ``CHATSTREAM_*`` variable and its range check. Nothing here
imports torch until a command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import envvars
from .fatal import report_fatal
from .settings import DEFAULT_MODEL, TABLE, Settings


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the chat server",
                       description="Run the ChatStream server. Every flag can also be set with the environment "
                                   "variable shown; a flag wins over its variable.")
    for setting in TABLE:
        extra = f"; default {setting.default}" if setting.default not in (None, "") else ""
        kwargs = {"type": setting.type, "help": f"{setting.help}{extra} [{setting.env}]"}
        if setting.choices:
            kwargs["choices"] = setting.choices
        p.add_argument(setting.flag, dest=setting.name, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatstream", description="Streaming chat server for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    prep = sub.add_parser("prepare-model", help="convert the builtin model, or download a hub model, once",
                          description="Convert the builtin GGUF model to safetensors in the cache directory "
                                      f"[{envvars.CACHE_DIR}], so that the server starts in seconds; or download "
                                      "an hf:ORG/NAME model into the hub cache [HF_HUB_CACHE] with progress "
                                      "lines, as the operator's model cache Job does.")
    prep.add_argument("--model", default=DEFAULT_MODEL)
    prep.add_argument("--revision", help="hub revision (branch, tag or commit) of an hf: model; default main")
    prep.add_argument("--ready-file", help="for hf: models, a file written when the download is complete; "
                                           "when it exists, nothing is downloaded")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "prepare-model":
        if args.model.startswith("hf:"):
            return _fill_hub_cache(args)  # before chatstream.engine, which imports torch
        from .loader import ModelLoadError, parse_source, prepare_builtin
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
    try:
        settings = Settings.from_env(**overrides)
    except SystemExit as exc:
        report_fatal(str(exc))
        return 2
    from .threads import set_wait_policy
    set_wait_policy(settings.threads)  # before torch loads OpenMP, which reads it once: threads.py says why
    from .loader import ModelLoadError, parse_source
    try:
        parse_source(settings.model, settings.revision)
    except ModelLoadError as exc:
        report_fatal(f"error: {exc}")
        return 2
    from .server.runner import serve
    return serve(settings)


def _fill_hub_cache(args) -> int:
    """Exit 0 when the model is in the hub cache; 2 when another try cannot
    help (the operator's Job then stops retrying), 1 when it might."""
    from .hub_cache import FillError, fill
    try:
        fill(args.model, args.revision, args.ready_file)
    except FillError as exc:
        report_fatal(f"error: {exc}")
        return 2 if exc.final else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
