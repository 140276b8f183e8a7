"""`chatstream-operator` / `python -m chatstream_operator`: run the operator."""

from __future__ import annotations

import argparse
import os

import kopf

from .resources import Images


# Images.<role> -> what the image is for; the flag is --image for cpu and --<role>-image for the others.
IMAGE_FLAGS = {
    "cpu": "service image for resources that name none",
    "gpu": "service image for resources that name none and want a GPU",
    "router": "image of the session-affine router (HAProxy) put in front of each resource's pods",
    "activator": "image of the activator beside the router of autoscaled resources (the operator's own)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chatstream-operator", description=__doc__)
    p.add_argument("-n", "--namespace", action="append", default=[],
                   help="watch only this namespace (repeatable); all namespaces when omitted")
    p.add_argument("--liveness", default=os.environ.get("CHATSTREAM_OPERATOR_LIVENESS", "http://0.0.0.0:8080/healthz"),
                   help="URL the liveness endpoint listens on ('' turns it off)")
    p.add_argument("--log-format", choices=["json", "plain"], default="json")
    p.add_argument("--verbose", action="store_true")
    for role, what in IMAGE_FLAGS.items():
        flag = "image" if role == "cpu" else f"{role}-image"
        variable = "CHATSTREAM_OPERATOR_" + flag.upper().replace("-", "_")
        p.add_argument(f"--{flag}", dest=f"{role}_image", default=os.environ.get(variable, getattr(Images, role)),
                       help=f"{what} (${variable})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fmt = kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN
    kopf.configure(verbose=args.verbose, log_format=fmt)
    from . import handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        standalone=True,  # one replica; no peering objects to create
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(images=Images(**{role: getattr(args, f"{role}_image") for role in IMAGE_FLAGS})),
    )


if __name__ == "__main__":
    main()
