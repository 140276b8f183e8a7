#!/usr/bin/env bash
# Debian packages the cluster tests and the image builds need. Idempotent:
# installs only what is missing. Go itself is expected at /usr/local/go.
#   scripts/system-deps-cluster.sh           # control plane: openssl, curl
#   scripts/system-deps-cluster.sh images    # plus podman, runc, debootstrap
#   scripts/system-deps-cluster.sh node      # plus the real node: containerd,
#                                            # CNI plugins, iptables, a static C toolchain (pause)
set -euo pipefail
pkgs=(openssl curl ca-certificates)
case "${1:-}" in
  "") ;;
  images) pkgs+=(podman runc debootstrap uidmap fuse-overlayfs) ;;
  node) pkgs+=(podman runc debootstrap uidmap fuse-overlayfs
               containerd containernetworking-plugins iptables iproute2 gcc libc6-dev) ;;
  *) echo "usage: $0 [images|node]" >&2; exit 2 ;;
esac
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "[system-deps] installing ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
