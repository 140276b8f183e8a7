"""Holding requests while no pod is up: the router's side of autoscaling (pure builders).

With spec.autoscaling set, the router pod runs a second container beside
HAProxy, the activator (activator.py, from the operator's image). HAProxy
sends a request there whenever its pods backend has no server up (scaled to
zero, or every pod still starting); the activator holds it, bounded in time
and count, while the operator (which it wakes at once, see /signal) scales
the Deployment up, then sends it back into HAProxy through a frontend that
listens on the pod's loopback only and always uses the pods backend. So a
held request is routed by the same rules as any other (stickiness, the
table, X-Served-By), and the activator needs neither DNS nor the pods'
addresses. The same container serves the load signal the operator scales
on, read from HAProxy's stats socket (a local file in a shared volume).

Why not HAProxy alone: it queues only behind servers that exist and are at
their maxconn; with no server up it answers 503 at once. Why in the router
pod and not in the operator: the held requests and their streams stay on
the data path, which the operator is not; the operator can restart without
dropping a held request.
"""

from __future__ import annotations

from . import autoscale, security

PROXY_PORT = 8081          # the activator, for HAProxy only (127.0.0.1)
CONTROL_PORT = 8405        # the activator's /signal, /metrics, /healthz (the operator reads /signal)
REPLAY_PORT = 8001         # HAProxy frontend on 127.0.0.1: held requests, released, enter the pods backend here
CONTAINER = "activator"
HOLD_TIMEOUT_SECONDS = 300  # under the router's 10 min stream timeout; a GPU pod may need minutes to load
MAX_HELD_REQUESTS = 100     # bodies of up to 1 MiB each: bounded memory
PRESTOP_SLEEP_SECONDS = 5  # HAProxy's (router.PRESTOP_SLEEP_SECONDS; a test holds them equal)
RESOURCES = {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}


def settings(spec: dict) -> dict | None:
    """What the activator needs from the spec (None without spec.autoscaling)."""
    a = spec.get("autoscaling")
    if a is None:
        return None
    conc = spec.get("concurrency") or {}
    return {
        "holdTimeoutSeconds": a.get("holdTimeoutSeconds", HOLD_TIMEOUT_SECONDS),
        "maxHeldRequests": a.get("maxHeldRequests", MAX_HELD_REQUESTS),
        # Requests one pod accepts (streaming + queued): released held requests never overflow a pod's queue.
        "podCapacity": conc.get("maxConcurrentStreams", 8) + conc.get("maxQueueSize", 32),
    }


def slots_for(spec: dict) -> int:
    """Replicas the router's server slots must cover: with autoscaling, the
    most it may scale to (spec.replicas is brought within it), so that
    scaling never changes the config."""
    p = autoscale.policy(spec)
    return p.max_replicas if p else spec["replicas"]


def haproxy_sections(hold_timeout: int, proxy: str = f"127.0.0.1:{PROXY_PORT}",
                     check_port: int = CONTROL_PORT, replay_bind: str = f"127.0.0.1:{REPLAY_PORT}") -> list[str]:
    """The replay frontend and the activator backend of haproxy.cfg."""
    return [
        "",
        "frontend replay",
        "    # Held requests the activator releases: on the pod's loopback only, never",
        "    # back to the activator (with no pod up, HAProxy's own 503).",
        f"    bind {replay_bind}",
        "    option http-no-delay",
        "    default_backend pods",
        "",
        "backend activator",
        "    option http-no-delay",
        "    option abortonclose",
        "    # Silent while it holds a request (no SSE progress for a non-streaming one).",
        f"    timeout server {hold_timeout + 600}s",
        "    option httpchk GET /healthz",
        "    http-check expect status 200",
        f"    server activator {proxy} check port {check_port} inter 2s fastinter 500ms downinter 1s rise 1 fall 2",
    ]


def container(spec: dict, image: str, run_volume: str = "run", socket: str = "/run/haproxy/admin.sock") -> dict:
    """The activator container of the router pod. It runs as the router's
    user (the pod's runAsUser), so it may open HAProxy's stats socket."""
    s = settings(spec)
    return {
        "name": CONTAINER,
        "image": image,
        "command": ["python", "-m", "chatstream_operator.activator"],
        "args": [
            f"--listen=127.0.0.1:{PROXY_PORT}",
            f"--control=0.0.0.0:{CONTROL_PORT}",
            f"--haproxy-socket={socket}",
            f"--replay=http://127.0.0.1:{REPLAY_PORT}",
            f"--hold-timeout={s['holdTimeoutSeconds']}",
            f"--max-held={s['maxHeldRequests']}",
            f"--pod-capacity={s['podCapacity']}",
            # Relayed streams get the time the pods give theirs.
            f"--grace={spec['shutdownGraceSeconds']}",
        ],
        "ports": [{"name": "activator", "containerPort": CONTROL_PORT, "protocol": "TCP"}],
        "resources": RESOURCES,
        # Listening while HAProxy does (its preStop): a request at zero that
        # reaches a stopping router is still held, not refused.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "activator"}, "periodSeconds": 10,
                          "failureThreshold": 3},
        "securityContext": security.locked_down(),
        "volumeMounts": [{"name": run_volume, "mountPath": "/run/haproxy"}],
    }


def service_port() -> dict:
    return {"name": "activator", "port": CONTROL_PORT, "targetPort": "activator", "protocol": "TCP"}

