"""Filling a hub cache with one model revision, once, with progress in the log.

`chatstream prepare-model --model hf:ORG/NAME --ready-file PATH` runs this in
the operator's fill Job (docs/operator.md, Model cache): huggingface_hub's
`snapshot_download` puts the revision into `HF_HUB_CACHE` (its own layout:
`models--ORG--NAME/{blobs,snapshots,refs}`), then the ready file is written,
last and atomically. Pods wait for that file, then load the model with
`HF_HUB_OFFLINE=1` from the same directory, mounted read-only. A ready file
that exists already means the work is done: nothing is asked of the hub.

Imports no torch (nor chatstream.engine, which does): the Job starts in a
second and needs little memory.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

PROGRESS_SECONDS = 5.0
_NOWHERE = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


class LogProgress(tqdm):
    """A tqdm bar that prints whole lines, one every PROGRESS_SECONDS at most
    and one when it is done; nothing before the first byte.

    huggingface_hub's own bars turn themselves off without a terminal, and a
    carriage-return bar in a container log is one endless line; these are
    read with `kubectl logs -f job/...`."""

    def __init__(self, *args, **kwargs):
        kwargs["mininterval"] = PROGRESS_SECONDS
        # tqdm's own writes (carriage returns, a newline on close) go nowhere; display() prints the lines.
        kwargs["file"] = _NOWHERE
        self._printed, self._printed_at = None, 0.0
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if not self.n:
            return True
        done = bool(self.total) and self.n >= self.total
        if self.unit == "B":
            line = f"{self.format_sizeof(self.n)}B"
            if self.total:
                line += f" of {self.format_sizeof(self.total)}B ({100 * self.n / self.total:.0f}%)"
            rate = self.format_dict.get("rate")
            if rate and not done:
                line += f", {self.format_sizeof(rate)}B/s"
        else:
            line = f"{self.n:.0f} of {self.total:.0f}" if self.total else f"{self.n:.0f}"
        line = f"{(self.desc or 'progress').rstrip(': ')}: {line}"
        now = time.monotonic()
        if line != self._printed and (done or now - self._printed_at >= PROGRESS_SECONDS):
            print(line, file=sys.stdout, flush=True)
            self._printed, self._printed_at = line, now
        return True


class FillError(Exception):
    """The fill failed; `final` when trying again cannot help (no such repo or
    revision, no access), so that the Job stops retrying."""

    def __init__(self, message: str, final: bool):
        super().__init__(message)
        self.final = final


def fill(source: str, revision: str | None, ready_file: str | None) -> dict:
    """Download `source` (hf:ORG/NAME) at `revision` into the hub cache and
    write `ready_file`; return what the ready file says."""
    repo, rev = parse_hub_source(source, revision)
    if ready_file and os.path.exists(ready_file):
        done = json.loads(Path(ready_file).read_text())
        print(f"{source}@{done.get('revision')} is in the cache already (commit {done.get('commit')}, "
              f"filled {done.get('finished')}): nothing to download", flush=True)
        return done

    from huggingface_hub import constants, snapshot_download
    import logging
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request; the progress lines say enough
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    print(f"downloading {repo}@{rev} from {constants.ENDPOINT} into {constants.HF_HUB_CACHE}", flush=True)
    t0 = time.monotonic()
    try:
        folder = Path(snapshot_download(repo, revision=rev, tqdm_class=LogProgress))
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise FillError(f"cannot download {source}@{rev}: {type(exc).__name__}: {_first_line(exc)}", final=True) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        raise FillError(f"cannot download {source}@{rev}: {_first_line(exc)}", final=status in (401, 403)) from exc
    except Exception as exc:  # the network, the disk: worth another try
        raise FillError(f"cannot download {source}@{rev}: {type(exc).__name__}: {_first_line(exc)}", final=False) from exc
    files = [p for p in folder.rglob("*") if p.is_file()]
    done = {
        "source": source, "revision": rev, "commit": folder.name,
        "files": len(files), "bytes": sum(p.stat().st_size for p in files),
        "seconds": round(time.monotonic() - t0, 1),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if ready_file:
        _write_atomically(Path(ready_file), json.dumps(done, indent=2) + "\n")
    print(f"filled {source}@{rev}: commit {done['commit']}, {done['files']} files, "
          f"{done['bytes'] / 1e6:.1f} MB in {done['seconds']} s", flush=True)
    return done


def parse_hub_source(source: str, revision: str | None) -> tuple[str, str]:
    """(ORG/NAME, revision) of hf:ORG/NAME[@revision], as loader.parse_source reads it."""
    if not source.startswith("hf:"):
        raise FillError(f"only hf: sources are downloaded into a hub cache, not {source!r}", final=True)
    repo, _, at = source.removeprefix("hf:").partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise FillError(f"hub ids look like hf:ORG/NAME[@revision], not {source!r}", final=True)
    return repo, revision or at or "main"


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(exc).__name__


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    staging.replace(path)  # readers see no file or the whole file
