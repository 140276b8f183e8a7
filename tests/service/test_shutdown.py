"""SIGTERM on the real `chatstream serve` process: drain, then exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
from support.net import free_port, wait_ready

from chatstream.server.runner import ADMIT_AFTER_SIGTERM_SECONDS


def test_sigterm_drains_streams_in_flight(tmp_path):
    port = free_port()
    env = {**os.environ, "CHATSTREAM_PORT": str(port), "CHATSTREAM_MAX_CONCURRENT": "2",
           "CHATSTREAM_MAX_NEW_TOKENS": "400", "CHATSTREAM_SHUTDOWN_GRACE_SECONDS": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "chatstream", "serve", "--temperature", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def alive():
            assert proc.poll() is None, proc.stdout.read()
        wait_ready(url, 120, alive)
        with httpx.Client(base_url=url, timeout=120) as client:
            # A stream that outlives the admit window (a story runs to the 400-token cap, about 10 s here):
            # the server stays up past it, so that the request sent after the window meets a live server.
            story = "Write a long story about a cat."
            with client.stream("POST", "/chat_stream", json={"user_input": story}) as r:
                chunks = r.iter_text()
                first = next(chunks)
                proc.send_signal(signal.SIGTERM)
                t_term = time.monotonic()
                time.sleep(0.5)
                with httpx.Client(base_url=url, timeout=60) as other:
                    ready = other.get("/readyz")
                    assert ready.status_code == 503 and ready.json()["reason"] == "draining"
                    # The balancers have not seen readiness fail yet: what they still send is answered...
                    admitted = other.post("/chat_stream", json={"user_input": "hi"})
                    assert admitted.status_code == 200, admitted.text
                    time.sleep(max(0.0, t_term + ADMIT_AFTER_SIGTERM_SECONDS + 0.5 - time.monotonic()))
                    # ...and after that, refused.
                    refused = other.post("/chat_stream", json={"user_input": "hi"})
                    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
                rest = "".join(chunks)
                still_in_flight = time.monotonic() - t_term
        assert len(first + rest) > 100, "the stream in flight ran to its end"
        assert still_in_flight > ADMIT_AFTER_SIGTERM_SECONDS + 0.5, "the stream outlived the admit window"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
