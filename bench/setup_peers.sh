#!/usr/bin/env bash
# Makes the peer environments the benchmark compares against (idempotent):
#
#   bench/.peers/chatstream030  ChatStream 0.3.0 from PyPI (+ fastsession, tokflow, loadtime)
#   bench/.peers/transformers   transformers[serving], the same transformers version as the project
#
# Each is its own venv. The heavy, shared stack (torch with its CUDA wheels is ~4 GB,
# transformers, tokenizers, fastapi, uvicorn) is read from the project venv through a .pth
# line placed AFTER the peer's own site-packages, so:
#   * nothing is downloaded twice, and all three servers run the very same torch kernels;
#   * whatever a peer needs in another version is installed into the peer venv and wins;
#   * pip never touches the project venv (it refuses to uninstall outside its environment).
#
# usage: bash bench/setup_peers.sh [chatstream030] [transformers]   (default: both)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PROJECT_PY=$ROOT/.venv/bin/python
PEERS=$ROOT/bench/.peers

if [ ! -x "$PROJECT_PY" ]; then
    echo "error: the project venv is missing; run 'make setup' first" >&2
    exit 1
fi
SHARED=$("$PROJECT_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
TRANSFORMERS_VERSION=$("$PROJECT_PY" -c 'import importlib.metadata as m; print(m.version("transformers"))')

make_venv() {  # make_venv NAME -> prints the venv's python
    local dir=$PEERS/$1
    if [ ! -x "$dir/bin/python" ]; then
        echo "==> [$1] creating venv $dir" >&2
        "$PROJECT_PY" -m venv "$dir"
    fi
    local site
    site=$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # a plain path line: appended to sys.path after the peer's own site-packages
    echo "$SHARED" > "$site/zz_bench_shared_project_stack.pth"
    echo "$dir/bin/python"
}

setup() {  # setup NAME CHECK_PYTHON_CODE PIP_SPEC...
    local name=$1 check=$2
    shift 2
    local stamp=$PEERS/$name/.bench-ready want="$* | shared=$SHARED"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PEERS/$name/bin/python" -c "$check" >/dev/null 2>&1; then
        echo "==> [$name] ready ($*)"
        return
    fi
    local py
    py=$(make_venv "$name")
    echo "==> [$name] pip install $* (torch/transformers reused from the project venv)"
    "$py" -m pip install --disable-pip-version-check --progress-bar on "$@"
    echo "==> [$name] checking"
    "$py" -c "$check"
    echo "$want" > "$stamp"
    echo "==> [$name] ready"
}

mkdir -p "$PEERS"
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(chatstream030 transformers)
for t in "${targets[@]}"; do
    case $t in
        chatstream030)
            setup chatstream030 "
import chatstream, fastsession, tokflow, torch, transformers, importlib.metadata as m
assert m.version('chatstream') == '0.3.0', m.version('chatstream')
assert '/.peers/chatstream030/' in chatstream.__file__, chatstream.__file__
from chatstream import ChatStream, AbstractChatPrompt
print('chatstream', m.version('chatstream'), 'torch', torch.__version__, 'transformers', transformers.__version__)
" chatstream==0.3.0
            ;;
        transformers)
            setup transformers "
import transformers, torch, fastapi, uvicorn, openai, rich
from transformers.cli.transformers import main
print('transformers', transformers.__version__, 'torch', torch.__version__)
" "transformers[serving]==$TRANSFORMERS_VERSION"
            ;;
        *)
            echo "unknown peer: $t (chatstream030, transformers)" >&2
            exit 2
            ;;
    esac
done
