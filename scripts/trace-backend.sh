#!/usr/bin/env bash
# The in-cluster trace backend: Jaeger v2 built with Go from its module (no
# registry, no prebuilt binary), put in an image with podman and imported into
# the real node's containerd.
#
#   scripts/trace-backend.sh build    the binary, cached under $CHATSTREAM_K8S_CACHE/jaeger
#   scripts/trace-backend.sh image    build, then the image localhost/jaeger:$JAEGER_VERSION
#   scripts/trace-backend.sh import   image, then into the node (only when the image changed)
#
# manifests/tracing/jaeger.yaml runs it; docs/operator.md shows the path.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"  # sets ROOT, the repository
JAEGER_VERSION="${JAEGER_VERSION:-v1.75.0}"  # the module's tag; cmd/jaeger is the v2 binary
MODULE="github.com/jaegertracing/jaeger"
DIR="$CACHE/jaeger/$JAEGER_VERSION"
IMAGE="localhost/jaeger:$JAEGER_VERSION"
BASE_IMAGE="${BASE_IMAGE:-localhost/debian-base:bookworm}"


build() { locked jaeger build_unlocked; }

build_unlocked() {
  [ -x "$DIR/jaeger" ] && return 0
  command -v go >/dev/null || { say "go is needed to build Jaeger"; exit 1; }
  local t0=$SECONDS src
  say "downloading $MODULE@$JAEGER_VERSION"
  src="$(GOFLAGS=-mod=mod go mod download -json "$MODULE@$JAEGER_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
  # The module has replace directives, so `go install mod@version` refuses
  # it: build inside a writable copy of its source instead.
  rm -rf "$DIR/src" && mkdir -p "$DIR" && cp -r "$src" "$DIR/src" && chmod -R u+w "$DIR/src"
  say "building cmd/jaeger (a few minutes on 2 cores; go prints each module it fetches)"
  (cd "$DIR/src" && CGO_ENABLED=0 go build -trimpath -o "$DIR/jaeger.tmp" \
      -ldflags "-s -w -X $MODULE/internal/version.latestVersion=$JAEGER_VERSION" ./cmd/jaeger)
  mv "$DIR/jaeger.tmp" "$DIR/jaeger"
  rm -rf "$DIR/src"
  say "built $DIR/jaeger in $((SECONDS - t0))s ($(du -h "$DIR/jaeger" | cut -f1))"
}

image() {
  build
  local ctx
  ctx="$(mktemp -d)"
  cp "$DIR/jaeger" "$ctx/jaeger"
  podman build --network host --layers -q --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    -f "$ROOT/scripts/images/jaeger.Containerfile" -t "$IMAGE" "$ctx" >/dev/null
  rm -rf "$ctx"
  say "image $IMAGE ready"
}

case "${1:-}" in
  build) build ;;
  image) image ;;
  import) image; "$ROOT/scripts/node-up.sh" import "$IMAGE" ;;
  *) echo "usage: $0 build|image|import" >&2; exit 2 ;;
esac
