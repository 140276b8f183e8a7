# Sourced by scripts/node-up.sh and scripts/node-down.sh: where the real node
# keeps its files, its fixed addresses, and process helpers keyed by PID files.
# shellcheck shell=bash
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER_DIR="${CLUSTER_DIR:-$ROOT/.cluster}"
CLUSTER_DIR="$(mkdir -p "$CLUSTER_DIR" && cd "$CLUSTER_DIR" && pwd)"  # absolute: the node's owner file names it
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"
NODE_DIR="$CACHE/node"
CTR_DIR="$NODE_DIR/containerd"
CTR_SOCK="$CTR_DIR/containerd.sock"
KUBELET_DIR="$NODE_DIR/kubelet"
export PATH="$BIN:/usr/local/go/bin:/usr/sbin:$PATH" KUBECONFIG="$KUBECONFIG_FILE"

NODE_NAME="chatstream-node"
BRIDGE="cni0"
NODE_IP="10.245.0.1"          # the bridge's address: kubelet, DNS and the apiserver
POD_SUBNET="10.245.0.0/24"
POD_NET="10.245.0.0/16"       # 10.244/16 is kwok's fake pod range
SERVICE_NET="10.96.0.0/16"
GUARD="CHATSTREAM-EGRESS"
TAINT_KEY="chatstream.io/real-node"
PAUSE_IMAGE="localhost/chatstream-pause:1.0"
KUBELET_HEALTHZ_PORT=10248
KUBE_PROXY_HEALTHZ_PORT=10256
KUBE_PROXY_METRICS_PORT=10249
COREDNS_READY_PORT=18181
NODE_PROCESSES=(coredns kube-proxy kubelet containerd)  # stop order
WAIT_LOGS="containerd kubelet kube-proxy coredns"  # what wait_for shows when the node does not come up

running() {  # running NAME: its PID file names a live process
  [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null
}

node_processes_alive() {  # node_processes_alive CLUSTER_DIR
  local name pid
  for name in "${NODE_PROCESSES[@]}"; do
    pid="$(cat "$1/run/$name.pid" 2>/dev/null)" || continue
    kill -0 "$pid" 2>/dev/null && return 0
  done
  return 1
}

start() {  # start NAME ARGS...: a session of its own, logs in $LOGS/NAME.log
  local name="$1"
  shift
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
}
