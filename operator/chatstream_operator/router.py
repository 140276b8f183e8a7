"""The session-affine router in front of one ChatStreamDeployment's pods.

Pure builders, like resources.py: an HAProxy configuration (haproxy.cfg) and
the children that run it -- a ConfigMap holding the file, a Deployment of the
router, the router's Service, and a headless Service whose DNS names the
ready pods (HAProxy's `server-template` resolves it through cluster DNS).

Why a router: with several replicas behind a plain Service, each turn of a
conversation lands on a random pod, which has neither the conversation's KV
prefix cache nor (with the memory store) its history. The router keeps every
conversation on one ready pod while that pod lives, spreads new ones by load,
and moves a conversation to another pod when its pod goes away. See
docs/routing.md for the rules a client relies on, the choices and the limits.

`haproxy_config(..., servers=[...])` renders the same file with an explicit
server list instead of DNS: tests/router runs the real haproxy binary on it.
"""

from __future__ import annotations

import hashlib
import re

from . import activation, resources, security

ROUTER_PORT = 8000          # what clients call: the same port as the pods
MONITOR_PORT = 8404         # the router's own /healthz and /metrics
COOKIE = "chatstream_session"   # service/chatstream/sessions/middleware.py COOKIE_NAME
DEFAULT_SESSION_HEADER = "X-Session-Id"
SERVED_BY_HEADER = "X-Served-By"
CONFIG_KEY = "haproxy.cfg"
CONFIG_DIR = "/usr/local/etc/haproxy"
CONFIG_HASH_ANNOTATION = f"{resources.GROUP}/router-config-hash"
CLUSTER_DOMAIN = "cluster.local"
# Server slots filled from DNS. A fixed number, so that scaling the pods up to
# it changes nothing in the config (no router restart, no table lost).
MIN_SLOTS = 32
# The request body HAProxy may inspect for `user` and the first messages is
# what fits in one buffer (tune.bufsize) with the headers. Larger bodies are
# forwarded whole, but only their start is inspected (docs/routing.md).
BUFSIZE = 65536
# Conversations remembered; each entry is ~100 bytes of string key + counters.
TABLE_SIZE = "1m"
TABLE_EXPIRE = "24h"
# Longest silence allowed inside a stream (a long prefill under load).
STREAM_TIMEOUT = "10m"
UID = 10002  # the router image's user (router/Containerfile)
PRESTOP_SLEEP_SECONDS = 5
# An HTTP header name (RFC 9110 token, kept simple); it is written into
# haproxy.cfg, so nothing else may get there. The CRD has the same pattern.
HEADER_PATTERN = re.compile(r"^[A-Za-z0-9-]{1,64}$")
# Up to two buffers (tune.bufsize) per side of a stream in flight: 2048
# connections could hold ~256 MiB of buffers at worst.
ROUTER_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}


def routing(spec: dict) -> dict:
    """spec.routing with the CRD's defaults (a hand-built spec may omit it)."""
    r = spec.get("routing") or {}
    return {"enabled": r.get("enabled", True), "sessionHeader": r.get("sessionHeader", DEFAULT_SESSION_HEADER)}


def router_name(name: str) -> str:
    return f"{name}-router"


def pods_service_name(name: str) -> str:
    return f"{name}-pods"


def router_labels(name: str) -> dict[str, str]:
    # Not the pods' labels: the pods' Service and the scale selector must not pick the router.
    return {"app.kubernetes.io/name": "chatstream-router", "app.kubernetes.io/instance": name}


def routing_endpoint(name: str, namespace: str) -> str:
    return f"http://{router_name(name)}.{namespace}.svc:{ROUTER_PORT}"


def slots(replicas: int) -> int:
    return max(MIN_SLOTS, replicas)


def haproxy_config(name: str, namespace: str, *, session_header: str = DEFAULT_SESSION_HEADER,
                   replicas: int = 1, servers: list[tuple[str, str]] | None = None,
                   bind: str = f":{ROUTER_PORT}", monitor_bind: str = f":{MONITOR_PORT}",
                   health_interval: str = "2s", affinity: bool = True,
                   stats_socket: str | None = "/run/haproxy/admin.sock", hard_stop_after: int = 30,
                   nameservers: list[str] | None = None, pod_port: int = resources.PORT,
                   activator: dict | None = None) -> str:
    """haproxy.cfg for one resource.

    servers: explicit (name, "host:port") pairs instead of the DNS template
    (tests); nameservers: "ip:port" DNS servers instead of the pod's
    /etc/resolv.conf and pod_port the pods' port (tests, with a local DNS
    server and pods on loopback addresses); affinity=False leaves
    out every stick rule (the tests use it to show that their assertions
    fail without them); activator: the arguments of
    activation.haproxy_sections, to hold requests while no pod is up."""
    if not HEADER_PATTERN.match(session_header):
        raise ValueError(f"routing.sessionHeader {session_header!r} is not a header name (letters, digits, '-')")
    header = session_header.lower()
    lines = [
        "# Rendered by chatstream-operator (chatstream_operator/router.py); edits are overwritten.",
        "global",
        "    log stdout format raw local0 info",
        "    maxconn 2048",
        f"    tune.bufsize {BUFSIZE}",
        "    # A stopping router (SIGUSR1, the image's STOPSIGNAL) lets streams in",
        "    # flight end for as long as a stopping pod does (spec.shutdownGraceSeconds).",
        f"    hard-stop-after {hard_stop_after}s",
    ]
    if stats_socket:
        lines.append(f"    stats socket {stats_socket} mode 600 level admin")
    lines += [
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    option dontlognull",
        "    timeout connect 3s",
        "    timeout client 1m",
        "    timeout http-request 30s",
        "    timeout http-keep-alive 1m",
        f"    timeout server {STREAM_TIMEOUT}",
        f"    timeout tunnel {STREAM_TIMEOUT}",
        "    timeout queue 30s",
        "",
    ]
    if servers is None:
        lines += [
            "resolvers cluster",
            *([f"    nameserver dns{i} {addr}" for i, addr in enumerate(nameservers, 1)] if nameservers
              else ["    parse-resolv-conf"]),
            "    accepted_payload_size 8192",
            "    resolve_retries 3",
            "    timeout resolve 1s",
            "    timeout retry 1s",
            "    hold valid 5s",
            "    hold obsolete 5s",
            "    hold nx 5s",
            "    hold refused 5s",
            "    hold timeout 5s",
            "    hold other 5s",
            "",
        ]
    lines += [
        "frontend monitor",
        f"    bind {monitor_bind}",
        "    # 503 while no pod is up: the router is not ready without one.",
        *(["    # With the activator, while it can hold requests it is."] if activator else []),
        "    monitor-uri /healthz",
        "    monitor fail if { nbsrv(pods) lt 1 }" + (" { nbsrv(activator) lt 1 }" if activator else ""),
        "    http-request set-log-level silent",
        "    http-request use-service prometheus-exporter if { path /metrics }",
        "",
        "frontend chat",
        f"    bind {bind}",
        "    option http-no-delay",
        "    option forwardfor",
        *(["    # No pod up (scaled to zero, or all starting): the activator holds it.",
           "    use_backend activator if { nbsrv(pods) lt 1 }"] if activator else []),
        "    default_backend pods",
        "",
        "backend pods",
        "    # New conversations go to the pod with the fewest requests in flight",
        "    # (round robin among equals); known ones to their pod (stick rules).",
        "    balance leastconn",
        "    option http-no-delay",
        "    # A client that leaves stops the pod's work: queued requests are dropped,",
        "    # and a stream in flight is closed towards the pod.",
        "    option abortonclose",
        "    # A conversation whose pod is gone moves to another pod (every retry",
        "    # picks another pod), and its stickiness entry is rewritten with the pod",
        "    # that answered.",
        "    option redispatch 1",
        "    retries 2",
        "    # Also when a pod died after the request went out and before any byte",
        "    # came back (the client saw nothing yet; the body is buffered for it).",
        "    retry-on conn-failure empty-response",
        "    option httpchk GET /readyz",
        "    http-check expect status 200",
        "    # No on-marked-down shutdown-sessions: a draining pod fails /readyz but",
        "    # finishes the streams it has (the pods' shutdownGraceSeconds).",
        f"    default-server inter {health_interval} fastinter 500ms downinter {health_interval} rise 1 fall 2",
        f"    http-response set-header {SERVED_BY_HEADER} %[srv_name]",
    ]
    if affinity:
        lines += [
            f"    stick-table type string len 64 size {TABLE_SIZE} expire {TABLE_EXPIRE}",
            "    # The body is read before routing (up to tune.bufsize) so that /v1 can",
            "    # be routed by `user` or by the conversation's first messages.",
            "    option http-buffer-request",
            "    acl v1 path_beg /v1/",
            "    # /chat_stream and the other cookie APIs: the session id (the signed",
            "    # cookie's first dot-separated field: the timestamp and signature after it may change).",
            f"    http-request set-var(txn.key) req.cook({COOKIE}),field(1,.),regsub(^,c:) if !v1 {{ req.cook({COOKIE}) -m found }}",
            f"    # /v1: the {session_header} header, else the OpenAI `user` field, else a hash",
            "    # of the first message (the first two when the first is the system prompt:",
            "    # a shared system prompt must not pin every conversation to one pod).",
            f"    http-request set-var(txn.key) req.hdr({header}),regsub(^,h:) if v1 {{ req.hdr({header}) -m found }}",
            "    http-request set-var(txn.key) req.body,json_query('$.user'),regsub(^,u:) if v1 !{ var(txn.key) -m found }",
            "    http-request set-var(txn.role0) req.body,json_query('$.messages[0].role') if v1 !{ var(txn.key) -m found }",
            "    http-request set-var(txn.first) req.body,json_query('$.messages[0].content') if v1 !{ var(txn.key) -m found }",
            "    http-request set-var(txn.second) req.body,json_query('$.messages[1].content') if v1 !{ var(txn.key) -m found } { var(txn.role0) -m str system }",
            "    http-request set-var(txn.key) var(txn.first),concat(|,txn.second),sha1,hex,regsub(^,m:) if v1 !{ var(txn.key) -m found } { var(txn.first) -m found }",
            "    stick match var(txn.key)",
            "    stick store-request var(txn.key)",
            "    # A new /chat_stream session: the cookie the pod sets names it.",
            f"    stick store-response res.cook({COOKIE}),field(1,.),regsub(^,c:)",
        ]
    if servers is None:
        fqdn = f"{pods_service_name(name)}.{namespace}.svc.{CLUSTER_DOMAIN}"
        lines.append(
            f"    server-template pod 1-{slots(replicas)} {fqdn}:{pod_port} check resolvers cluster"
            " init-addr none resolve-prefer ipv4"
        )
    else:
        lines += [f"    server {srv} {addr} check" for srv, addr in servers]
    if activator:
        lines += activation.haproxy_sections(**activator)
    return "\n".join(lines) + "\n"


def config_hash(config: str) -> str:
    return hashlib.sha256(config.encode()).hexdigest()[:16]


def _config(body: dict) -> str:
    meta, spec = body["metadata"], body["spec"]
    held = activation.settings(spec)
    return haproxy_config(meta["name"], meta["namespace"], session_header=routing(spec)["sessionHeader"],
                          replicas=activation.slots_for(spec), hard_stop_after=max(1, spec["shutdownGraceSeconds"]),
                          activator={"hold_timeout": held["holdTimeoutSeconds"]} if held else None)


def _metadata(body: dict, name: str, labels: dict) -> dict:
    meta = resources._metadata(body, name)
    meta["labels"] = {**labels, **resources.MANAGED_BY}
    return meta


def configmap(body: dict) -> dict:
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(body, router_name(name), router_labels(name)),
        "data": {CONFIG_KEY: _config(body)},
    }


def pods_service(body: dict) -> dict:
    """Headless: DNS answers with the ready pods' addresses (not-ready ones are
    left out), which the router's server-template resolves."""
    name = body["metadata"]["name"]
    spec = {
        "clusterIP": "None",
        "selector": resources.labels(name),
        "ports": [{"name": "http", "port": resources.PORT, "targetPort": "http", "protocol": "TCP"}],
        "publishNotReadyAddresses": False,
    }
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(body, pods_service_name(name), resources.labels(name)),
            "spec": spec}


def service(body: dict) -> dict:
    name = body["metadata"]["name"]
    spec = {
        "type": "ClusterIP",
        "selector": router_labels(name),
        "ports": [{"name": "http", "port": ROUTER_PORT, "targetPort": "http", "protocol": "TCP"}],
    }
    if activation.settings(body["spec"]):  # the operator reads the load there
        spec["ports"].append(activation.service_port())
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(body, router_name(name), router_labels(name)),
            "spec": spec}


def deployment(body: dict, image: str, activator_image: str = resources.Images.activator) -> dict:
    """One router pod (stick tables live in the process; docs/routing.md says
    why not more). With routing disabled it is scaled to 0: the operator may
    not delete, and a Deployment at 0 runs nothing. The config's hash is a pod
    annotation, so a new config rolls the router. With spec.autoscaling the
    activator runs beside HAProxy (activation.py)."""
    meta, spec = body["metadata"], body["spec"]
    name = meta["name"]
    config = _config(body)
    probe = {"httpGet": {"path": "/healthz", "port": "monitor"}, "periodSeconds": 5, "timeoutSeconds": 2,
             "failureThreshold": 2}
    container = {
        "name": "haproxy",
        "image": image,
        "args": ["-db", "-f", f"{CONFIG_DIR}/{CONFIG_KEY}"],
        "ports": [
            {"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"},
            {"name": "monitor", "containerPort": MONITOR_PORT, "protocol": "TCP"},
        ],
        "resources": ROUTER_RESOURCES,
        # The router Service stops sending new connections before HAProxy stops listening.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "readinessProbe": probe,
        # Alive while the process answers at all, pods up or not.
        "livenessProbe": {"tcpSocket": {"port": "monitor"}, "periodSeconds": 10, "failureThreshold": 3},
        "securityContext": security.locked_down(),
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": "run", "mountPath": "/run/haproxy"}],
    }
    pod_spec = {
        "containers": [container] + ([activation.container(spec, activator_image)] if activation.settings(spec) else []),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": spec["shutdownGraceSeconds"] + PRESTOP_SLEEP_SECONDS + 10,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [{"name": "config", "configMap": {"name": router_name(name)}},
                    {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}],
    }
    # spec.nodeSelector and tolerations are for the model pods (often GPU
    # nodes); the router has its own in spec.routing and otherwise goes
    # wherever it fits.
    placement = spec.get("routing") or {}
    if placement.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(placement["nodeSelector"])
    if placement.get("tolerations"):
        pod_spec["tolerations"] = [dict(t) for t in placement["tolerations"]]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(body, router_name(name), router_labels(name)),
        "spec": {
            "replicas": 1 if routing(spec)["enabled"] else 0,
            "selector": {"matchLabels": router_labels(name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": router_labels(name), "annotations": {CONFIG_HASH_ANNOTATION: config_hash(config)}},
                "spec": pod_spec,
            },
        },
    }


def children(body: dict, image: str, activator_image: str = resources.Images.activator) -> list[dict]:
    """Everything the router needs, in apply order (config before its reader)."""
    return [configmap(body), pods_service(body), service(body), deployment(body, image, activator_image)]
