#!/usr/bin/env python3
"""Write charts/chatstream/templates/crd.yaml from manifests/crd.yaml.

manifests/crd.yaml is the CRD's one source of truth; the chart's copy adds
only the install switch and `helm.sh/resource-policy: keep`.
tests/operator/test_crd.py fails when the two drift: run this script then.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "manifests" / "crd.yaml"
TARGET = ROOT / "charts" / "chatstream" / "templates" / "crd.yaml"

HEADER = "# Generated from manifests/crd.yaml by hack/sync-chart-crd.py: edit that file, then run this.\n"


def chart_crd(source: str) -> str:
    lines = source.splitlines(keepends=True)
    body = [line for line in lines if not line.startswith("#")]  # drop the source's header comment
    out = [HEADER, "{{- if .Values.crd.install }}\n"]
    for line in body:
        out.append(line)
        if line.rstrip() == "metadata:":
            out.append("  annotations:\n")
            out.append("    # Uninstalling the chart must not delete every ChatStreamDeployment.\n")
            out.append("    helm.sh/resource-policy: keep\n")
    out.append("{{- end }}\n")
    return "".join(out)


def main() -> int:
    text = chart_crd(SOURCE.read_text())
    if "--check" in sys.argv:
        if TARGET.read_text() != text:
            print(f"{TARGET} is stale: run hack/sync-chart-crd.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
