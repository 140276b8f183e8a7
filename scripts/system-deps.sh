#!/usr/bin/env bash
# Debian packages the service tests use: a real browser for the chat page and a
# real Redis for shared sessions, HAProxy for the session-affine router.
# Idempotent: installs only what is missing. The cluster and image parts have
# their own list (system-deps-cluster.sh), called from here.
set -euo pipefail
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v redis-server >/dev/null || need+=(redis-server)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)  # tests/router: the real router
command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)  # tests/router: DNS for server-template
if ((${#need[@]})); then
  echo "==> installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# The control plane, the container images (podman, runc, debootstrap) and the
# real node (containerd, CNI plugins, iptables, gcc for the pause binary).
bash scripts/system-deps-cluster.sh node
