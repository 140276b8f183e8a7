#!/usr/bin/env bash
# One real Kubernetes node on this machine, joined to the control plane of
# scripts/cluster-up.sh (which calls this script): containerd (Debian), the
# CNI bridge and host-local plugins (Debian), kubelet and kube-proxy (built
# with Go next to the control plane), CoreDNS (built with Go) answering the
# cluster's names on the bridge address, and an egress guard so that nothing
# a pod sends leaves the machine.
#
#   scripts/node-up.sh              bring the node up (idempotent; a no-op when up)
#   scripts/node-up.sh bridge       only the bridge and the guard (the apiserver binds to it)
#   scripts/node-up.sh build        only build CoreDNS (scripts/prebuild.sh)
#   scripts/node-up.sh import IMG.. import podman images into the node's containerd,
#                                   only those whose image ID changed since the last import
#
# Work directories are cached under $CHATSTREAM_K8S_CACHE/node (containerd's
# root with the imported images, the stamps of what was imported, the pause
# binary); certificates, PID files and logs live in the cluster's directory.
# Only one node per machine (fixed bridge, fixed kubelet paths): the node
# belongs to the cluster directory named in $NODE_DIR/owner, and a second
# cluster gets exit status 3 instead of a second node.
#
# Env: CLUSTER_DIR (.cluster), CHATSTREAM_NODE_TAINT (1: taint the node so that
# only pods that tolerate chatstream.io/real-node land on it; 0: no taint).
set -euo pipefail

# shellcheck source=scripts/node-env.sh
source "$(dirname "$0")/node-env.sh"  # sets ROOT, the repository
COREDNS_VERSION="v1.12.0"
TAINT="${CHATSTREAM_NODE_TAINT:-1}"


# --- network ----------------------------------------------------------------

bridge() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  [[ "$(ip -4 -o addr show dev "$BRIDGE")" == *" $NODE_IP/"* ]] || ip addr add "$NODE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  guard
}

# The bridge plugin turns on ip_forward. Pods may talk to pods, to Services
# and to the node itself; any other packet coming in from the bridge is
# dropped before routing, so nothing a pod sends leaves the machine.
guard() {
  iptables -t raw -N "$GUARD" 2>/dev/null || true
  iptables -t raw -F "$GUARD"
  iptables -t raw -A "$GUARD" -d "$POD_NET" -j RETURN
  iptables -t raw -A "$GUARD" -d "$SERVICE_NET" -j RETURN
  iptables -t raw -A "$GUARD" -j DROP
  iptables -t raw -C PREROUTING -i "$BRIDGE" -j "$GUARD" 2>/dev/null ||
    iptables -t raw -I PREROUTING -i "$BRIDGE" -j "$GUARD"
}

cni_config() {
  mkdir -p "$NODE_DIR/cni/net.d" "$NODE_DIR/cni/ipam"
  cat >"$NODE_DIR/cni/net.d/10-chatstream.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "chatstream",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "hairpinMode": true, "ipMasq": false,
     "ipam": {"type": "host-local", "dataDir": "$NODE_DIR/cni/ipam",
              "ranges": [[{"subnet": "$POD_SUBNET", "gateway": "$NODE_IP"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

# --- containerd -------------------------------------------------------------

containerd_config() {
  mkdir -p "$CTR_DIR/root" "$CTR_DIR/state" "$CTR_DIR/runc" "$CTR_DIR/opt"
  cat >"$CTR_DIR/config.toml" <<EOF
# Written by scripts/node-up.sh: every path under $CTR_DIR.
version = 2
root = "$CTR_DIR/root"
state = "$CTR_DIR/state"
[grpc]
  address = "$CTR_SOCK"
[plugins."io.containerd.internal.v1.opt"]
  path = "$CTR_DIR/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  disable_apparmor = true
  # This sandbox has no CAP_SYS_RESOURCE: even root cannot lower
  # oom_score_adj, which the CRI asks for (-998 for the sandbox).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "$CTR_DIR/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni/net.d"
EOF
}

ctr_() { ctr --address "$CTR_SOCK" --namespace k8s.io "$@"; }

start_containerd() {
  running containerd && return 0
  containerd_config
  start containerd containerd --config "$CTR_DIR/config.toml"
  wait_for containerd 30 ctr_ version
}

# --- images -----------------------------------------------------------------


# import IMAGE: podman's image into containerd, only when its ID changed since
# the last import (a stamp per image under $NODE_DIR/images) or containerd
# lost it. The old content is garbage-collected by containerd, so one copy stays.
import_image() {
  local image="$1" id stamp t0=$SECONDS size bytes
  id="$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null)" ||
    { say "no podman image $image (scripts/build-images.sh builds it)"; return 1; }
  stamp="$NODE_DIR/images/$(echo "$image" | tr '/:' '__').id"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$id" ] && [ -n "$(ctr_ images ls -q "name==$image" 2>/dev/null)" ]; then
    say "$image: already imported (${id:0:12})"
    return 0
  fi
  bytes="$(podman image inspect --format '{{.Size}}' "$image")"
  size="$(awk -v b="$bytes" 'BEGIN {printf "%.2f GB", b/1e9}')"
  say "importing $image (${id:0:12}, $size) into containerd; a 7 GB image takes 2-4 min"
  mkdir -p "$NODE_DIR/images"
  rm -f "$stamp"
  # podman save writes a docker-archive, which keeps the image's name; dd
  # shows progress. podman first writes the archive to a temporary file: in
  # memory when there is room, so that the disk holds no third copy.
  TMPDIR="$(big_tmpdir "$bytes")" podman save "$image" |
    dd bs=4M iflag=fullblock status=progress 2> >(tr '\r' '\n' | awk '/copied/ { printf "\r[node-up import] %-70.70s", $0 } END { print "" }' >&2) |
    ctr_ images import - >/dev/null
  echo "$id" >"$stamp"
  say "imported $image in $((SECONDS - t0))s"
}

big_tmpdir() {  # big_tmpdir BYTES: /dev/shm if it and free memory have room, else /var/tmp
  local need=$(($1 + $1 / 5)) shm mem
  shm="$(df --output=avail -B1 /dev/shm 2>/dev/null | tail -1)"
  mem="$(($(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) * 1024))"
  if [ "${shm:-0}" -gt "$need" ] && [ "$mem" -gt $((need + 4 * 1024 * 1024 * 1024)) ]; then
    echo /dev/shm
  else
    echo /var/tmp
  fi
}

pause_image() {
  local dir="$NODE_DIR/pause" want
  want="$(cat "$ROOT/hack/pause/pause.c" "$ROOT/hack/pause/Containerfile" | sha256sum | cut -d' ' -f1)"
  if ! podman image exists "$PAUSE_IMAGE" || [ "$(cat "$dir/.sha256" 2>/dev/null)" != "$want" ]; then
    say "building the pause image $PAUSE_IMAGE (static C, FROM scratch)"
    mkdir -p "$dir"
    gcc -Os -static -o "$dir/pause" "$ROOT/hack/pause/pause.c"
    strip "$dir/pause"
    cp "$ROOT/hack/pause/Containerfile" "$dir/"
    podman build --network none -q -t "$PAUSE_IMAGE" "$dir" >/dev/null
    echo "$want" >"$dir/.sha256"
  fi
  import_image "$PAUSE_IMAGE"
}

# --- certificates and kubeconfigs ------------------------------------------

kubeconfig() {  # kubeconfig NAME: a kubeconfig for the client cert NAME
  local name="$1" server
  server="$(awk '/server:/ {print $2; exit}' "$KUBECONFIG_FILE")"
  cat >"$CLUSTER_DIR/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: chatstream-test
  cluster: {server: "$server", certificate-authority: "$PKI/ca.crt"}
users:
- name: $name
  user: {client-certificate: "$PKI/$name.crt", client-key: "$PKI/$name.key"}
contexts:
- name: chatstream-test
  context: {cluster: chatstream-test, user: $name}
current-context: chatstream-test
EOF
  chmod 600 "$CLUSTER_DIR/$name.kubeconfig"
}

node_pki() {
  cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "IP:$NODE_IP,DNS:$NODE_NAME"
  cert kube-proxy "/CN=system:kube-proxy"
  kubeconfig kubelet
  kubeconfig kube-proxy
}

# --- kubelet, kube-proxy, CoreDNS -------------------------------------------

kubelet_config() {
  mkdir -p "$KUBELET_DIR"
  echo "nameserver $NODE_IP" >"$NODE_DIR/resolv.conf"  # never the host's resolver
  cat >"$NODE_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failSwapOn: false
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
containerRuntimeEndpoint: unix://$CTR_SOCK
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
clusterDomain: cluster.local
clusterDNS: [$NODE_IP]
resolvConf: "$NODE_DIR/resolv.conf"
maxPods: 30
serializeImagePulls: false
# Images are imported, not pulled, so the kubelet must never delete them:
# under disk pressure its eviction manager reclaims space by deleting every
# image no running container uses (seen here while an image build filled the
# shared disk: the imported 6.7 GB image went). "0%" switches the disk signals
# off (the kubelet ignores 0% thresholds); memory eviction stays; and no
# image garbage collection.
evictionHard: {memory.available: 300Mi, nodefs.available: "0%", imagefs.available: "0%", nodefs.inodesFree: "0%", imagefs.inodesFree: "0%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
registerNode: true
nodeLabels: {chatstream.io/real-node: "true"}
EOF
}

start_kubelet() {
  running kubelet && return 0
  kubelet_config
  start kubelet "$BIN/kubelet" --config "$NODE_DIR/kubelet.yaml" \
    --kubeconfig "$CLUSTER_DIR/kubelet.kubeconfig" --root-dir "$KUBELET_DIR" \
    --cert-dir "$KUBELET_DIR/pki" --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v 1
}

start_kube_proxy() {
  running kube-proxy && return 0
  cat >"$NODE_DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: $POD_NET
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT
metricsBindAddress: 127.0.0.1:$KUBE_PROXY_METRICS_PORT
clientConnection: {kubeconfig: "$CLUSTER_DIR/kube-proxy.kubeconfig"}
conntrack: {maxPerCore: 0}
EOF
  start kube-proxy "$BIN/kube-proxy" --config "$NODE_DIR/kube-proxy.yaml"
}

build_coredns() { locked coredns build_coredns_unlocked; }

build_coredns_unlocked() {
  [ -x "$BIN/coredns" ] && [ "$(cat "$BIN/.coredns.version" 2>/dev/null)" = "$COREDNS_VERSION" ] && return 0
  say "building CoreDNS $COREDNS_VERSION with Go (about 2-4 min the first time)"
  local tmp
  tmp="$(mktemp -d)"
  (cd "$tmp" && GOBIN="$tmp" GOFLAGS="-p=${GO_BUILD_PARALLELISM:-2} -trimpath" \
    nice go install -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION")
  mkdir -p "$BIN"
  mv "$tmp/coredns" "$BIN/coredns"
  rm -rf "$tmp"
  echo "$COREDNS_VERSION" >"$BIN/.coredns.version"
}

# Cluster names only: the kubernetes plugin answers cluster.local and reverse
# lookups of pods and Services; every other name gets NXDOMAIN (no forward),
# so no query leaves the machine.
start_coredns() {
  running coredns && return 0
  cat >"$NODE_DIR/Corefile" <<EOF
cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {
    bind $NODE_IP
    errors
    ready 127.0.0.1:$COREDNS_READY_PORT
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $KUBECONFIG_FILE chatstream-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
}
.:53 {
    bind $NODE_IP
    template ANY ANY {
        rcode NXDOMAIN
    }
}
EOF
  start coredns "$BIN/coredns" -conf "$NODE_DIR/Corefile"
}

node_ready() {
  kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -q True
}

apply_taint() {
  if [ "$TAINT" = 1 ]; then
    kubectl taint node "$NODE_NAME" "$TAINT_KEY=true:NoSchedule" --overwrite >/dev/null
  else
    kubectl taint node "$NODE_NAME" "$TAINT_KEY-" >/dev/null 2>&1 || true
  fi
}

# --- main -------------------------------------------------------------------

claim() {  # the node is this cluster's, or nobody's
  local owner
  owner="$(cat "$NODE_DIR/owner" 2>/dev/null || true)"
  if [ -n "$owner" ] && [ "$owner" != "$CLUSTER_DIR" ] && node_processes_alive "$owner"; then
    say "the real node already belongs to the cluster in $owner; not starting a second one"
    exit 3
  fi
  mkdir -p "$NODE_DIR"
  echo "$CLUSTER_DIR" >"$NODE_DIR/owner"
}

up() {
  [ -f "$KUBECONFIG_FILE" ] || { say "no control plane in $CLUSTER_DIR (scripts/cluster-up.sh starts one)"; exit 1; }
  claim
  mkdir -p "$LOGS" "$RUN"
  if running containerd && running kubelet && running kube-proxy && running coredns && node_ready; then
    apply_taint
    say "node $NODE_NAME already up"
    return 0
  fi
  local t0=$SECONDS
  build_coredns
  bridge
  cni_config
  node_pki
  start_containerd
  pause_image
  start_kubelet
  wait_for "node $NODE_NAME Ready" 90 node_ready
  apply_taint
  start_kube_proxy
  start_coredns
  wait_for CoreDNS 30 curl -sf "http://127.0.0.1:$COREDNS_READY_PORT/ready"
  wait_for kube-proxy 30 curl -sf "http://127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT/healthz"
  say "node $NODE_NAME Ready in $((SECONDS - t0))s (pods on $POD_SUBNET, DNS on $NODE_IP)"
}

case "${1:-up}" in
  up) up ;;
  bridge) bridge ;;
  build) build_coredns ;;  # scripts/prebuild.sh: CoreDNS only, nothing started
  import)
    shift
    running containerd || { say "containerd is not running (scripts/node-up.sh starts it)"; exit 1; }
    for image in "$@"; do import_image "$image"; done
    ;;
  *) echo "usage: $0 [up|bridge|build|import IMAGE...]" >&2; exit 2 ;;
esac
