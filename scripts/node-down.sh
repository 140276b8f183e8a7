#!/usr/bin/env bash
# Stop the real node of scripts/node-up.sh and leave the machine as it was:
# pods gone, kube-proxy's rules flushed, no containers, no mounts, no bridge,
# no egress guard, no kubepods cgroups. containerd's root (the imported
# images) and the stamps stay in $CHATSTREAM_K8S_CACHE/node for the next run.
# Only this cluster's node is touched (its PID files under CLUSTER_DIR/run);
# a node that belongs to another cluster directory is left alone.
set -uo pipefail

# shellcheck source=scripts/node-env.sh
source "$(dirname "$0")/node-env.sh"  # sets ROOT, the repository


owner="$(cat "$NODE_DIR/owner" 2>/dev/null || true)"
if [ -n "$owner" ] && [ "$owner" != "$CLUSTER_DIR" ]; then
  say "the node belongs to the cluster in $owner; leaving it"
  exit 0
fi
[ -n "$owner" ] || { say "no node to stop"; exit 0; }

api() { kubectl --request-timeout=10s "$@" >/dev/null 2>&1; }

# 1. While the kubelet still runs: no new pods, and the running ones are
#    stopped by the kubelet itself (CNI teardown, volumes unmounted).
if running kubelet && api get --raw /readyz; then
  api cordon "$NODE_NAME"
  api delete pods --all-namespaces --field-selector "spec.nodeName=$NODE_NAME" --grace-period=0 --force --wait=false
  for _ in $(seq 1 60); do
    [ -z "$(ctr --address "$CTR_SOCK" -n k8s.io tasks ls -q 2>/dev/null)" ] && break
    sleep 0.5
  done
  api delete node "$NODE_NAME" --wait=false
fi

# 2. The processes, newest first.
for name in "${NODE_PROCESSES[@]}"; do
  if [ "$name" = containerd ] && running containerd; then
    # Whatever the kubelet left: kill the tasks, so that their shims exit.
    for id in $(ctr --address "$CTR_SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$CTR_SOCK" -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1
    done
    sleep 1
    for id in $(ctr --address "$CTR_SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$CTR_SOCK" -n k8s.io tasks delete -f "$id" >/dev/null 2>&1
    done
  fi
  stop "$name"
done
# Shims of this containerd (found by its socket path) that outlived it.
for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $CTR_SOCK" 2>/dev/null); do
  kill -9 "$pid" 2>/dev/null
done

# 3. kube-proxy's iptables rules, the bridge and the guard.
"$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
# What --cleanup leaves: the kubelet's and kube-proxy's canary, hint and
# firewall chains (KUBE-FIREWALL drops non-loopback packets to 127/8).
for ipt in iptables ip6tables; do
  for table in filter nat mangle; do
    "$ipt" -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j KUBE-' | grep -v '^-A KUBE-' | sed 's/^-A/-D/' |
      while read -r rule; do eval "$ipt -t $table $rule" 2>/dev/null; done
    chains="$("$ipt" -t "$table" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}')"
    for chain in $chains; do "$ipt" -t "$table" -F "$chain" 2>/dev/null; done
    for chain in $chains; do "$ipt" -t "$table" -X "$chain" 2>/dev/null; done
  done
done
ip link del "$BRIDGE" 2>/dev/null
while iptables -t raw -D PREROUTING -i "$BRIDGE" -j "$GUARD" 2>/dev/null; do :; done
iptables -t raw -F "$GUARD" 2>/dev/null && iptables -t raw -X "$GUARD" 2>/dev/null

# 4. Mounts under the node's directory (pod volumes, container rootfs, shm),
#    the network namespaces containerd made, and the fixed paths the kubelet
#    and containerd use whatever their config says.
findmnt -rn -o TARGET | grep -F "$NODE_DIR/" | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
for ns in /run/netns/cni-*; do
  [ -e "$ns" ] || continue
  umount -l "$ns" 2>/dev/null
  rm -f "$ns"
done
for hierarchy in /sys/fs/cgroup/*/; do
  [ -d "$hierarchy/kubepods" ] && find "$hierarchy/kubepods" -depth -type d -exec rmdir {} + 2>/dev/null
done
rm -rf /var/lib/kubelet/device-plugins /var/lib/kubelet/pod-resources /run/containerd/s /var/lib/cni/results
rmdir /var/lib/kubelet 2>/dev/null
rm -rf "$CTR_DIR/state" "$CTR_DIR/runc" "$KUBELET_DIR" "$NODE_DIR/cni/ipam"
rm -f "$NODE_DIR/owner"
say "stopped"
