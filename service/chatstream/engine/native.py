"""The engine's compiled kernels, built on first use: the batch-invariant attention
(attention_kernel.cpp), the row-wise steps of a layer between its products (layer_kernel.cpp) and,
where the CPU has AMX, the bfloat16 products (linear_kernel.cpp, used by bf16_linear.py); with those,
the whole loop over a pass's layers in one call (pass_kernel.cpp), and a row's cached span copied
across every layer in one call (rows_kernel.cpp).

Why: attention.py gets its invariance out of PyTorch operators, about twenty of them a layer (a
product per block of keys, masks, maxima, sums, padding to four query rows), and on the 2-core AMD
EPYC of bench/results that costs more than bfloat16 products save (bench/step_profile.py: 20.7 ms of
a 54.1 ms step at 8 rows x 400 positions, against 12.1 ms for SDPA). The kernel is one call a layer
and is invariant by how it is written, not by what MKL happens to do: each query is computed alone,
over the keys it sees, in an order fixed in the source (the file says how). The norms, rotary
embedding, residual adds and activation of the bfloat16 mode are about sixty more operator calls a
layer; layer_kernel.cpp makes them three.

The kernels are compiled here with the machine's C++ compiler against the installed torch, for this
CPU (``-march=native``), once, into the cache directory (19 s on the 2-core Intel Xeon of
bench/results, the files side by side; logged); later starts load them in well under a second. Where no compiler is found
or the build fails, :func:`load` says why and the engine keeps PyTorch's operators (attention.py's
for attention), which are invariant too. ``CHATSTREAM_NATIVE_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import torch

log = logging.getLogger("chatstream.engine")

HERE = Path(__file__).parent
SOURCES = [HERE / "attention_kernel.cpp", HERE / "layer_kernel.cpp", HERE / "linear_kernel.cpp", HERE / "pass_kernel.cpp",
           HERE / "rows_kernel.cpp"]
HEADERS = [HERE / "kernel_math.h", HERE / "kernels.h"]
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fno-fast-math", "-std=c++20", "-fPIC", "-shared",
         "-fopenmp"]


@functools.cache
def load() -> str | None:
    """None once the ``torch.ops.chatstream`` kernels can be called, else why not (once per process)."""
    return _load()


def loaded() -> bool:
    """Whether :func:`load` has run and the kernels can be called; never builds them (a caller that only
    saves time with them must not start a 20 s build)."""
    return load.cache_info().currsize > 0 and load() is None


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float,
           key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``q`` (``[B, kv_heads, M, head_dim]``, each key/value head's queries grouped) over
    ``keys``/``values`` (``[B, kv_heads, L, head_dim]``, views of longer cache rows read in place) where
    query ``m`` sees key ``j`` when ``mask[b, m % R, j]`` (``mask``: ``[B, R, L]``, bool). int8 keys and
    values come with their scales (``[B, kv_heads, L]`` float32: a key is ``keys[..., j, :] *
    key_scales[..., j]``)."""
    return torch.ops.chatstream.attend(q, keys, values, mask, scale, key_scales, value_scales)


def rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``hidden`` (``[T, H]`` float32) += ``delta`` in place where given, then each row's RMSNorm, in bfloat16."""
    return torch.ops.chatstream.rms_norm(hidden, delta, weight, eps)


def rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int, key_cache: torch.Tensor,
           value_cache: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
           key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q (``[T, q_heads, D]`` float32) of a fused q/k/v product, turned by the rotary embedding (``cos``,
    ``sin``: ``[T, D]``); token t's k (turned too) and v are written into the caches (``[rows, kv_heads,
    capacity, D]``) at row ``rows[t]``, position ``positions[t]``, unless ``rows[t] < 0``. int8 caches
    take each head's key and value quantized (:func:`quantize_int8`'s rule, per position and head), their
    scales going into ``key_scales``/``value_scales`` (``[rows, kv_heads, capacity]`` float32)."""
    return torch.ops.chatstream.rotary(qkv, cos, sin, q_heads, key_cache.shape[1], key_cache, value_cache,
                                       key_scales, value_scales, rows, positions)


def layers(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
           weights: tuple, cache: list[torch.Tensor], decode: tuple[int, int, torch.Tensor | None],
           prefill: tuple[int, int, int, int, torch.Tensor | None]) -> None:
    """``hidden`` (``[T, hidden]`` float32, updated in place) through every decoder layer in one call
    (pass_kernel.cpp), as llama_forward.py's loop of :func:`rms_norm`, products, :func:`rotary`,
    :func:`attend` and :func:`silu_mul` runs them. ``weights``: (norms, packed, scales, out_features, eps,
    q_heads, kv_heads, scale), two norms and four products a layer; ``cache``: each layer's keys and
    values (and their scales, int8) in turn. ``decode``: (rows, view, mask ``[rows, 1, view]``), the
    pass's first tokens; ``prefill``: (chunks, width, first row, view, mask ``[chunks, width, view]``),
    the rest, right-aligned."""
    torch.ops.chatstream.layers(hidden, cos, sin, rows, positions, *weights, cache, *decode, *prefill)


def copy_spans(src: list[torch.Tensor], src_row: int, dst: list[torch.Tensor], dst_row: int, length: int) -> None:
    """Positions ``[0, length)`` of each ``src`` buffer's row ``src_row`` into each ``dst`` buffer's row
    ``dst_row`` (buffers ``[rows, kv_heads, capacity(, D)]``; a row of -1: the buffer is one kept span,
    ``[kv_heads, positions(, D)]``), in one call (rows_kernel.cpp)."""
    torch.ops.chatstream.copy_spans(src, src_row, dst, dst_row, length)


def clone_spans(buffers: list[torch.Tensor], row: int, length: int) -> list[torch.Tensor]:
    """A copy of positions ``[0, length)`` of each buffer's row ``row``, in one call (rows_kernel.cpp)."""
    return torch.ops.chatstream.clone_spans(buffers, row, length)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate/up product (``[T, 2I]``), in bfloat16 (``[T, I]``)."""
    return torch.ops.chatstream.silu_mul(gate_up)


@functools.cache
def amx_linear() -> bool:
    """Whether linear_kernel.cpp's AMX products serve the bfloat16 mode: kernels built, the CPU and the
    OS give AMX, and ``CHATSTREAM_AMX_LINEAR`` is not 0 (read once: a process never mixes kernels)."""
    return (os.environ.get("CHATSTREAM_AMX_LINEAR", "1") != "0" and load() is None
            and torch.ops.chatstream.linear_available())


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (``[out_features, in_features]``) in the layout :func:`linear` reads."""
    return torch.ops.chatstream.pack_linear(weight)


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bf16_out: bool) -> torch.Tensor:
    """``x @ W.T`` of bfloat16 ``x`` (``[..., in_features]``) and a packed ``W``, summed in float32: in
    bfloat16 (rounded once) or float32."""
    return torch.ops.chatstream.linear(x, packed, out_features, bf16_out)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (``[out_features, in_features]``) as int8 and one float32 scale per output: its largest
    magnitude over 127 (weight ~ q * scale, each weight to within half a scale)."""
    w = weight.detach().float()
    largest = w.abs().amax(dim=1)
    scales = torch.where(largest > 0, largest / 127, torch.ones_like(largest)).contiguous()
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def pack_linear_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` quantized (:func:`quantize_int8`) in the layout :func:`linear_int8` reads, and its scales."""
    q, scales = quantize_int8(weight)
    return torch.ops.chatstream.pack_linear_int8(q), scales


def linear_int8(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, out_features: int,
                bf16_out: bool) -> torch.Tensor:
    """``x @ W.T`` of bfloat16 ``x`` and an int8 ``W`` from :func:`pack_linear_int8`, summed exactly in
    integers (linear_kernel.cpp says how): float32, or bfloat16 rounded once from it."""
    return torch.ops.chatstream.linear_int8(x, packed, scales, out_features, bf16_out)


def _load() -> str | None:
    if os.environ.get("CHATSTREAM_NATIVE_KERNELS", "1") == "0":
        return "turned off (CHATSTREAM_NATIVE_KERNELS=0)"
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return "no C++ compiler (g++) on this machine"
    library = _cache_dir() / f"kernels-{_key()}.so"
    if not library.exists():
        try:
            library.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"no cache directory for the kernels: {exc}"
        reason = _build(compiler, library)
        if reason:
            return reason
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as exc:
        return f"loading {library} failed: {exc}"
    return None


def _cache_dir() -> Path:
    root = os.environ.get("CHATSTREAM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chatstream")
    return Path(root) / "kernels"


def _key() -> str:
    """What the library depends on: its sources, the flags, torch's version and this CPU's flags."""
    digest = hashlib.sha256()
    for path in SOURCES + HEADERS:
        digest.update(path.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(torch.__version__.encode())
    try:
        with open("/proc/cpuinfo") as f:
            digest.update(next((line for line in f if line.startswith("flags")), "").encode())
    except OSError:
        pass
    return digest.hexdigest()[:16]


def compile_command(compiler: str, source: Path, obj: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The command that compiles one of :data:`SOURCES` to an object against the installed torch."""
    from torch.utils import cpp_extension

    includes = [*(f"-I{path}" for path in cpp_extension.include_paths()), f"-I{sysconfig.get_paths()['include']}"]
    return [compiler, *FLAGS, *extra, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *includes,
            "-c", str(source), "-o", str(obj)]


def _build(compiler: str, library: Path) -> str | None:
    """Each source compiled to an object at once (the machine's cores share them), then linked."""
    torch_lib = Path(torch.__file__).parent / "lib"
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    objects = [partial.with_suffix(f".{source.stem}.o") for source in SOURCES]
    compiles = [compile_command(compiler, source, obj) for source, obj in zip(SOURCES, objects)]
    link = [compiler, *FLAGS, *map(str, objects), "-o", str(partial), f"-L{torch_lib}", "-lc10", "-ltorch_cpu",
            f"-Wl,-rpath,{torch_lib}"]
    log.info("compiling the engine's kernels for this CPU (once, about 20 s) into %s", library)
    start = time.perf_counter()
    running: list[subprocess.Popen] = []
    try:
        running = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in compiles]
        errors = [p.communicate(timeout=600)[1] for p in running]
        if any(p.returncode for p in running):  # a compiler may fail without a word on stderr
            failed = "\n".join(err for p, err in zip(running, errors) if p.returncode)
            return f"compiling the kernels failed: {failed.strip()[-2000:]}"
        done = subprocess.run(link, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            return f"linking the kernels failed: {done.stderr.strip()[-2000:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"compiling the kernels failed: {exc}"
    finally:
        for p in running:
            if p.poll() is None:
                p.kill()
        for obj in objects:
            obj.unlink(missing_ok=True)
    os.replace(partial, library)  # atomic: a second process never loads half a file
    log.info("kernels compiled in %.0f s", time.perf_counter() - start)
    return None
