# Sourced by scripts/*.sh: ROOT (the repository), the paths they share and the helpers
# that were copied between them.
# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CHATSTREAM_K8S_CACHE:-$HOME/.cache/chatstream-k8s}"  # binaries, the node's images, builds
BIN="$CACHE/bin"
CLUSTER_DIR="${CLUSTER_DIR:-$ROOT/.cluster}"  # the cluster's state:
KUBECONFIG_FILE="$CLUSTER_DIR/kubeconfig"     # its admin kubeconfig,
PKI="$CLUSTER_DIR/pki"                        # certificates,
LOGS="$CLUSTER_DIR/logs"                      # the processes' logs
RUN="$CLUSTER_DIR/run"                        # and their PID files

# Progress on stderr, named after the script: [node-up 12:00:01] ...
say() { printf '[%s %s] %s\n' "$(basename "$0" .sh)" "$(date +%T)" "$*" >&2; }

# crun fails on this kernel's cgroups: podman runs containers with runc.
podman() { command podman --runtime /usr/sbin/runc "$@"; }

cert() {  # cert NAME SUBJECT [SANS]: a key and a certificate signed by $PKI/ca, kept if present
  local name="$1" subj="$2" sans="${3:-}" ext="$PKI/$1.ext"
  [ -f "$PKI/$name.crt" ] && return 0
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/$name.key" 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' >"$ext"
  [ -n "$sans" ] && echo "subjectAltName=$sans" >>"$ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$ext"
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...: until COMMAND succeeds, or show the logs and exit
  local what="$1" limit="$2" i name logs=()
  shift 2
  for ((i = 0; i < limit * 4; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  say "$what did not come up in ${limit}s; logs are in $LOGS"
  # WAIT_LOGS: the names of the logs worth showing (default: every log in $LOGS)
  if [ -n "${WAIT_LOGS:-}" ]; then
    for name in $WAIT_LOGS; do logs+=("$LOGS/$name.log"); done
  else
    logs=("$LOGS"/*.log)
  fi
  tail -n 30 "${logs[@]}" >&2 2>/dev/null || true
  exit 1
}

stop() {  # stop NAME: the process in $RUN/NAME.pid, SIGTERM, then SIGKILL after 10 s
  local pid
  pid="$(cat "$RUN/$1.pid" 2>/dev/null)" || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$RUN/$1.pid"
}

# locked NAME COMMAND...: COMMAND while holding $CACHE/.NAME.lock. A build may be started twice on
# one machine (scripts/prebuild.sh in the background, then a test's fixture): the second waits for
# the first and then finds its result. A subshell holds the lock, so processes COMMAND starts and
# leaves running (none do) would not keep it.
locked() {
  local name="$1"
  shift
  mkdir -p "$CACHE"
  ( flock 9; "$@" ) 9>"$CACHE/.$name.lock"
}
