#!/usr/bin/env bash
# Builds ahead what the tests on the cluster and the real node build once per machine: the
# control plane's binaries, kubectl and helm, CoreDNS, the images and Jaeger. tests/conftest.py
# starts it in the background, niced, when a pytest run selects those tests, and runs them last:
# on a fresh machine the builds (about 13 min of Go on 2 cores, several of images) then overlap
# the tests that need none of it, instead of holding up the first node test. Every step is a
# no-op when its result is cached, and each holds a lock (lib.sh `locked`), so the fixture that
# asks for the same build later waits for this one instead of running a second.
#
#   scripts/prebuild.sh
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"  # sets ROOT, the repository
t0=$SECONDS
step() {  # step WHAT COMMAND...
  local what="$1" t=$SECONDS
  shift
  say "$what"
  "$@"
  say "$what: done in $((SECONDS - t))s"
}
# The images (downloads, unpacking, layer commits: mostly the disk and the network) beside the Go
# builds (the CPU), as the node tests' fixtures did before.
mkdir -p "$LOGS"
step images bash "$ROOT/scripts/build-images.sh" >"$LOGS/prebuild-images.log" 2>&1 &
images=$!
step "control plane binaries, kubectl and helm" bash "$ROOT/scripts/cluster-up.sh" build
step CoreDNS bash "$ROOT/scripts/node-up.sh" build
step Jaeger bash "$ROOT/scripts/trace-backend.sh" build
wait "$images" || { say "the image build failed: $LOGS/prebuild-images.log"; exit 1; }
say "all built in $((SECONDS - t0))s"
