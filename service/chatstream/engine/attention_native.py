"""The batch-invariant attention as one compiled kernel (attention_kernel.cpp), built on first use.

Why: attention.py gets its invariance out of PyTorch operators, about twenty of them a layer (a
product per block of keys, masks, maxima, sums, padding to four query rows), and on the 2-core AMD
EPYC of bench/results that costs more than bfloat16 products save (bench/step_profile.py: 20.7 ms of
a 54.1 ms step at 8 rows x 400 positions, against 12.1 ms for SDPA). The kernel is one call a layer
and is invariant by how it is written, not by what MKL happens to do: each query is computed alone,
over the keys it sees, in an order fixed in the source (the file says how).

The kernel is compiled here with the machine's C++ compiler against the installed torch, for this
CPU (``-march=native``), once, into the cache directory (8-11 s on the 2-core Intel Xeon of
bench/results, logged); later starts load it in
well under a second. Where no compiler is found or the build fails, :func:`load` says why and the
engine keeps attention.py's operators, which are invariant too. ``CHATSTREAM_NATIVE_ATTENTION=0``
turns the kernel off.
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

SOURCE = Path(__file__).with_name("attention_kernel.cpp")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fno-fast-math", "-std=c++20", "-fPIC", "-shared",
         "-fopenmp"]


@functools.cache
def load() -> str | None:
    """None once ``torch.ops.chatstream.attend`` can be called, else why it cannot (once per process)."""
    return _load()


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Attention of ``q`` (``[B, kv_heads, M, head_dim]``, each key/value head's queries grouped) over
    ``keys``/``values`` (``[B, kv_heads, L, head_dim]``, views of longer cache rows read in place) where
    query ``m`` sees key ``j`` when ``mask[b, m % R, j]`` (``mask``: ``[B, R, L]``, bool)."""
    return torch.ops.chatstream.attend(q, keys, values, mask, scale)


def _load() -> str | None:
    if os.environ.get("CHATSTREAM_NATIVE_ATTENTION", "1") == "0":
        return "turned off (CHATSTREAM_NATIVE_ATTENTION=0)"
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return "no C++ compiler (g++) on this machine"
    library = _cache_dir() / f"attention-{_key()}.so"
    if not library.exists():
        try:
            library.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"no cache directory for the kernel: {exc}"
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
    """What the library depends on: its source, the flags, torch's version and this CPU's flags."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(torch.__version__.encode())
    try:
        with open("/proc/cpuinfo") as f:
            digest.update(next((line for line in f if line.startswith("flags")), "").encode())
    except OSError:
        pass
    return digest.hexdigest()[:16]


def _build(compiler: str, library: Path) -> str | None:
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    command = [compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               *(f"-I{path}" for path in cpp_extension.include_paths()),
               f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(partial),
               f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    log.info("compiling the batch-invariant attention kernel for this CPU (once, about 10 s) into %s", library)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"compiling the kernel failed: {exc}"
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        return f"compiling the kernel failed: {done.stderr.strip()[-2000:]}"
    os.replace(partial, library)  # atomic: a second process never loads half a file
    log.info("attention kernel compiled in %.0f s", time.perf_counter() - start)
    return None
