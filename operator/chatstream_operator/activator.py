"""The activator: holds requests while a resource has no pod up, and serves its load signal.

Runs beside HAProxy in the router pod (activation.py says why and how it is
wired). HAProxy sends it a request when its pods backend has no server up.
The request is held, first come first served, until HAProxy reports a pod up
with room for it (servers up x the pod's streams and queue, less what is in
flight), then sent back into HAProxy's loopback replay frontend, which routes
it like any other; the answer is relayed as it comes. Bounds: at most
`max_held` requests are held (more get 503 with Retry-After at once), each
for at most `hold_timeout` seconds (then 503 with Retry-After), both in the
service's one error shape. A streaming /v1 request gets its 200 and SSE
comments (": waiting for a model pod (4s)") while it waits, so it sees
progress; a timeout is then an error event, as the pods send one mid-stream.

/signal is the load the operator scales on: requests in flight at the pods
and queued in HAProxy (its stats socket: no Prometheus, no scrape lag) plus
those held here. `?wait=S&since=N` answers at once when a request was held
after the N-th (so a request at zero wakes the operator at once), else after
S seconds. /metrics shows the same for Prometheus.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import io
import json
import logging
import signal
from dataclasses import dataclass

from aiohttp import ClientError, ClientSession, ClientTimeout, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("chatstream_activator")

# Hop-by-hop headers (RFC 9110), and the length, which the relay recomputes.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "trailers", "transfer-encoding", "upgrade", "content-length"})
MAX_BODY_BYTES = 1 << 20   # what the pods accept (chatstream.server.request_body.MAX_BODY_BYTES)
RETRY_AFTER_SECONDS = 10
PROGRESS_SECONDS = 2.0     # an SSE comment this often to a held streaming client
SERVED_BY = "X-Served-By"  # router.SERVED_BY_HEADER: set on answers from a pod, not on HAProxy's own 503


@dataclass(frozen=True)
class Stats:
    in_flight: int   # requests at the pods (HAProxy's backend sessions)
    queued: int      # requests queued in HAProxy
    up: int          # pods up


async def haproxy_stats(path: str) -> Stats:
    """The pods backend's row of `show stat` on HAProxy's stats socket."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(b"show stat\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
    for row in rows:
        if row.get("pxname") == "pods" and row.get("svname") == "BACKEND":
            return Stats(int(row["scur"] or 0), int(row["qcur"] or 0), int(row["act"] or 0))
    raise ValueError("HAProxy's stats have no pods backend")


def error_body(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "unavailable", "param": None, "code": code}}


def unavailable(message: str, code: str) -> web.Response:
    return web.json_response(error_body(message, code), status=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def wants_stream(request: web.Request, body: bytes) -> bool:
    """A /v1 request asking for server-sent events."""
    if request.method != "POST" or not request.path.startswith("/v1/"):
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("stream") is True


class Activator:
    def __init__(self, stats, replay: str, hold_timeout: float, max_held: int, pod_capacity: int = 0,
                 poll_seconds: float = 0.2):
        """stats: async () -> Stats; replay: base URL of HAProxy's replay frontend."""
        self.stats, self.replay = stats, replay.rstrip("/")
        self.hold_timeout, self.max_held, self.pod_capacity = hold_timeout, max_held, pod_capacity
        self.poll_seconds = poll_seconds
        self.latest: Stats | None = None
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.held_total = 0
        self._held_event = asyncio.Event()   # replaced on every new hold: wakes /signal and the watcher
        self._session: ClientSession | None = None
        r = self.registry = CollectorRegistry()
        Gauge("chatstream_activator_held_requests", "Requests held now (no pod up, or no room)",
              registry=r).set_function(lambda: len(self.waiting))
        self.m_held = Counter("chatstream_activator_held", "Requests held since start", registry=r)
        self.m_rejected = Counter("chatstream_activator_rejected", "Held requests answered 503", ["reason"], registry=r)
        self.m_hold = Histogram("chatstream_activator_hold_seconds", "Time a request was held",
                                buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600), registry=r)
        Gauge("chatstream_router_load", "Requests in flight, queued or held: the autoscaling signal",
              registry=r).set_function(lambda: self.load(self.latest))
        Gauge("chatstream_router_pods_up", "Pods HAProxy sees up", registry=r).set_function(
            lambda: self.latest.up if self.latest else 0)

    def load(self, stats: Stats | None) -> int:
        return (stats.in_flight + stats.queued if stats else 0) + len(self.waiting)

    # -- holding ---------------------------------------------------------------

    async def watch(self) -> None:
        """Read HAProxy's stats (often while requests are held) and release
        held requests into the room the pods up have."""
        failing = False
        while True:
            try:
                self.latest = await self.stats()
                failing = False
            except (OSError, ValueError, asyncio.TimeoutError) as err:
                if not failing:
                    log.warning("cannot read HAProxy's stats: %s", err)
                failing, self.latest = True, None
            self._release()
            event = self._held_event
            try:
                await asyncio.wait_for(event.wait(), self.poll_seconds if self.waiting else 1.0)
            except asyncio.TimeoutError:
                pass

    def _release(self) -> None:
        s = self.latest
        if s is None or s.up < 1:
            return
        room = s.up * self.pod_capacity - s.in_flight - s.queued if self.pod_capacity else len(self.waiting)
        while self.waiting and room > 0:
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(None)
                room -= 1

    async def _hold(self, request: web.Request, out: web.StreamResponse | None, stream: bool, deadline: float,
                    again: bool = False):
        """Wait in line until released or the deadline: (the SSE response if
        one was started, whether the request was released)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append(future)
        if not again:
            self.held_total += 1
            self.m_held.inc()
        self._held_event.set()
        self._held_event = asyncio.Event()
        started = loop.time()
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return out, False
                if stream and out is None:
                    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
                    await out.prepare(request)
                    await out.write(b": waiting for a model pod to start\n\n")
                try:
                    await asyncio.wait_for(asyncio.shield(future), min(remaining, PROGRESS_SECONDS))
                    return out, True
                except asyncio.TimeoutError:
                    if out is not None:
                        await out.write(f": waiting for a model pod ({loop.time() - started:.0f}s)\n\n".encode())
        finally:
            if not future.done():
                future.cancel()
                self.waiting.remove(future)
            self.m_hold.observe(loop.time() - started)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": {"message": f"the limit is {MAX_BODY_BYTES} bytes",
                                                "type": "invalid_request_error", "param": None,
                                                "code": "request_too_large"}}, status=413)
        stream = wants_stream(request, body)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold_timeout
        out, again = None, False
        while True:
            if len(self.waiting) >= self.max_held:
                return await self._refuse(out, "too_many_held", "too_many_held_requests",
                                          f"{self.max_held} requests are already waiting for a model pod to start")
            out, released = await self._hold(request, out, stream, deadline, again)
            if not released:
                return await self._refuse(out, "timeout", "no_ready_pod", f"no model pod was ready within "
                                          f"{self.hold_timeout:g}s; it may be starting: retry")
            again = True
            upstream = await self._send(request, headers, body)
            if upstream is not None and upstream.status == 503 and SERVED_BY not in upstream.headers:
                upstream.release()  # HAProxy's own 503: no pod up after all
                upstream = None
            if upstream is None:
                continue  # the pod went away again before the request reached it: hold it again
            async with upstream:
                return await self._relay(request, upstream, out)

    async def _send(self, request: web.Request, headers, body: bytes):
        """The request sent into HAProxy's replay frontend: its response, or None when that failed."""
        if self._session is None:
            # No decompression: bytes are relayed as the pod sent them, with their Content-Encoding.
            self._session = ClientSession(auto_decompress=False, timeout=ClientTimeout(total=None, connect=10))
        try:
            return await self._session.request(request.method, self.replay + request.rel_url.raw_path_qs,
                                               headers=headers, data=body, allow_redirects=False)
        except (ClientError, OSError) as err:
            log.warning("replaying a held request failed (%s); holding it again", err)
            await asyncio.sleep(self.poll_seconds)
            return None

    async def _relay(self, request: web.Request, upstream, out: web.StreamResponse | None) -> web.StreamResponse:
        if out is None:
            out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    out.headers.add(key, value)
            await out.prepare(request)
        elif upstream.status != 200:
            # The client has its 200 and SSE comments: the pod's refusal becomes an error event.
            raw = await upstream.content.read(MAX_BODY_BYTES)
            try:
                body = json.loads(raw)
                assert isinstance(body, dict) and "error" in body
            except (ValueError, AssertionError):
                body = error_body(f"the model pod answered {upstream.status}", "upstream_error")
            await out.write(f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode())
            await out.write_eof()
            return out
        async for chunk in upstream.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out

    async def _refuse(self, out: web.StreamResponse | None, reason: str, code: str, message: str):
        """A held request that will not be sent on: a 503 if nothing was answered yet, else the error
        event at the end of the progress stream; counted by `reason`."""
        self.m_rejected.labels(reason).inc()
        if out is None:
            return unavailable(message, code)
        return await self._fail_stream(out, message, code)

    async def _fail_stream(self, out: web.StreamResponse, message: str, code: str) -> web.StreamResponse:
        await out.write(f"retry: {RETRY_AFTER_SECONDS * 1000}\ndata: {json.dumps(error_body(message, code))}\n\n"
                        "data: [DONE]\n\n".encode())
        await out.write_eof()
        return out

    # -- the signal ------------------------------------------------------------

    async def signal(self, request: web.Request) -> web.Response:
        try:
            wait = min(max(float(request.query.get("wait", 0)), 0.0), 30.0)
            since = int(request.query.get("since", -1))
        except ValueError:
            return web.json_response({"error": {"message": "wait and since are numbers", "type":
                                                "invalid_request_error", "param": None, "code": None}}, status=400)
        if wait and since == self.held_total:
            try:
                await asyncio.wait_for(self._held_event.wait(), wait)
            except asyncio.TimeoutError:
                pass
        try:
            stats = await self.stats()
        except (OSError, ValueError, asyncio.TimeoutError) as err:
            return web.json_response(error_body(f"cannot read HAProxy's stats: {err}", "no_stats"), status=503)
        return web.json_response({"load": self.load(stats), "in_flight": stats.in_flight, "queued": stats.queued,
                                  "held": len(self.waiting), "held_total": self.held_total, "pods_up": stats.up})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def apps(activator: Activator) -> tuple[web.Application, web.Application]:
    """(the proxy, for HAProxy; the control app: /signal, /metrics, /healthz)."""
    proxy = web.Application(client_max_size=MAX_BODY_BYTES)
    proxy.router.add_route("*", "/{tail:.*}", activator.handle)
    control = web.Application()
    control.router.add_get("/signal", activator.signal)
    control.router.add_get("/metrics", activator.metrics)
    control.router.add_get("/healthz", healthz)
    return proxy, control


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "0.0.0.0", int(port)


async def serve(args: argparse.Namespace) -> None:
    async def stats() -> Stats:
        return await haproxy_stats(args.haproxy_socket)

    activator = Activator(stats, args.replay, args.hold_timeout, args.max_held, args.pod_capacity)
    proxy, control = apps(activator)
    # A client that leaves while held or streaming cancels its handler (its line
    # place, its upstream request); a stop waits for streams in flight.
    runners = [web.AppRunner(proxy, handle_signals=False, handler_cancellation=True, access_log=None,
                             shutdown_timeout=args.grace),
               web.AppRunner(control, handle_signals=False, access_log=None, shutdown_timeout=1)]
    for runner, bind in zip(runners, (args.listen, args.control)):
        await runner.setup()
        await web.TCPSite(runner, *_host_port(bind)).start()
    watcher = asyncio.create_task(activator.watch())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("activator listening on %s (control %s)", args.listen, args.control)
    await stop.wait()
    for runner in runners:
        await runner.cleanup()
    watcher.cancel()
    await activator.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chatstream_operator.activator", description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1:8081", help="host:port HAProxy sends held requests to")
    p.add_argument("--control", default="0.0.0.0:8405", help="host:port of /signal, /metrics and /healthz")
    p.add_argument("--haproxy-socket", default="/run/haproxy/admin.sock")
    p.add_argument("--replay", default="http://127.0.0.1:8001", help="HAProxy's replay frontend")
    p.add_argument("--hold-timeout", type=float, default=300.0, help="seconds a request may be held")
    p.add_argument("--max-held", type=int, default=100, help="requests held at most; more get 503 at once")
    p.add_argument("--pod-capacity", type=int, default=0,
                   help="requests one pod takes (streams + queue); 0 releases every held request at once")
    p.add_argument("--grace", type=float, default=30.0, help="seconds a stop waits for streams in flight")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
