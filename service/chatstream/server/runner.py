"""Running the app under uvicorn with a graceful drain on SIGTERM.

On the first SIGTERM (or Ctrl-C) readiness turns false at once, but new
requests are still admitted for ADMIT_AFTER_SIGTERM_SECONDS (at most the grace
period): the router's health checks need that long to see readiness fail
(two failed checks, 2 s apart then 0.5 s), and a request it sends meanwhile
would otherwise get a 503 (a rollout on the real node: 12 of 116 turns). Then
new requests get 503, while streams in flight and their completion callbacks
run to their end, for up to the grace period; then uvicorn shuts down. A second signal stops at
once. A model that cannot load stops the process with exit code 3 after
writing the loader's message where Kubernetes reads it (the container's
termination log), so that a pod says why instead of sitting Running and
NotReady forever.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from ..fatal import report_fatal
from ..settings import Settings
from .app import create_app

log = logging.getLogger("chatstream.server")

EXIT_MODEL_LOAD_FAILED = 3
ADMIT_AFTER_SIGTERM_SECONDS = 4.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, grace_seconds: float):
        super().__init__(config)
        self.state = state
        self.grace_seconds = grace_seconds
        state.on_load_failed = self._load_failed

    def _load_failed(self, message: str) -> None:
        report_fatal(f"model load failed: {message}")
        self.should_exit = True

    def handle_exit(self, sig, frame) -> None:
        cs = self.state.chat_stream
        if self.state.leaving or cs is None:  # the one "SIGTERM came" flag
            return super().handle_exit(sig, frame)
        self.state.leaving = True
        log.info("draining: %d streams in flight, up to %.0fs", cs.in_flight, self.grace_seconds)
        threading.Thread(target=self._drain, args=(cs,), daemon=True).start()

    def _drain(self, cs) -> None:
        deadline = time.monotonic() + self.grace_seconds
        time.sleep(min(ADMIT_AFTER_SIGTERM_SECONDS, self.grace_seconds))
        cs.stop_admitting()
        while cs.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if cs.in_flight:
            log.warning("grace period over with %d streams or callbacks in flight; stopping", cs.in_flight)
        else:
            log.info("all streams and callbacks finished; stopping")
        self.should_exit = True


def serve(settings: Settings) -> int:
    from ..threads import configure
    configure(settings.threads)  # before any thread runs torch: threads.py says why
    from ..auth import ApiKeysError
    try:
        app = create_app(settings)
    except ApiKeysError as exc:
        report_fatal(f"invalid settings: {exc}")
        return 2
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=5, access_log=False)
    DrainingServer(config, app.state.server, settings.shutdown_grace_seconds).run()
    return EXIT_MODEL_LOAD_FAILED if app.state.server.load_error else 0
