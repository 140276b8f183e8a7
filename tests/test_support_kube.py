"""The cluster tests' polling helper (tests/support/kube.py)."""

from __future__ import annotations

import httpx
from support.kube import wait_for


def test_wait_for_counts_a_refused_connection_as_not_yet():
    # A Service whose endpoints kube-proxy has not programmed yet refuses connections for a moment after
    # its ChatStreamDeployment turns Ready; httpx raises its own ConnectError there, not an OSError.
    calls = []

    def readyz():
        calls.append(1)
        if len(calls) < 3:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        return 200

    assert wait_for("the Service answering", readyz, timeout=5, interval=0.01) == 200
    assert len(calls) == 3
