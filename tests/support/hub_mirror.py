"""A Hugging Face hub stand-in: model directories served over HTTP in the
layout huggingface_hub's client expects, so that tests download through the
real library (`HF_ENDPOINT=http://...`) where the hub cannot be reached.

Standard library only: the node test ships this file in a ConfigMap and runs
it with the service image's python; tests/engine runs it as a process too.

    python hub_mirror.py --repo ORG/NAME=/path/to/model/dir [--repo ...]
                         [--port 8080] [--token SECRET] [--rate MB_PER_S]

What huggingface_hub asks for (checked against huggingface_hub 2.4 by
tests/engine/test_hub_cache.py):

- GET /api/models/ORG/NAME[/revision/REV]       repo info: `sha` (the commit), `siblings`
- GET /api/models/ORG/NAME/tree/REV[/PATH]      the file listing (`snapshot_download`, and
                                                transformers looking for chat templates)
- HEAD|GET /ORG/NAME/resolve/REV/PATH           a file, with X-Repo-Commit, ETag and
                                                Content-Length, the headers hf_hub_download
                                                keys its cache by

Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound,
EntryNotFound, GatedRepo), which the client turns into its typed errors (an
optional file that is absent must be EntryNotFound, or transformers fails).
Each repo has one revision, `main`, whose commit is a hash of its files.
With --token, every request needs `Authorization: Bearer SECRET` (a gated
repo), else 401 GatedRepo.

Every request is printed to stdout as one line, `REQUEST <method> <path>
<status>`, the log a test reads to tell whether a pod downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

CHUNK = 1 << 20


class Repo:
    def __init__(self, repo_id: str, root: str):
        self.id, self.root = repo_id, os.path.abspath(root)
        self.files: dict[str, tuple[int, str]] = {}  # path -> (size, git blob sha1)
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                if rel.startswith(".") or "/." in rel:
                    continue  # hidden files (a converter's staging leftovers) are not part of the model
                self.files[rel] = (os.path.getsize(full), _git_blob_sha1(full))
        listing = "\n".join(f"{path} {oid}" for path, (_, oid) in sorted(self.files.items()))
        self.commit = hashlib.sha1(listing.encode()).hexdigest()

    def resolve(self, revision: str) -> str | None:
        return self.commit if revision in ("main", self.commit) else None

    def info(self) -> dict:
        return {
            "_id": self.commit[:24], "id": self.id, "modelId": self.id, "sha": self.commit,
            "private": False, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": [], "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": path} for path in sorted(self.files)],
        }

    def tree(self, path: str, recursive: bool) -> list[dict] | None:
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries, folders = [], set()
        for name, (size, oid) in sorted(self.files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "oid": oid, "size": size, "path": name})
        if prefix and not entries and not folders:
            return None
        return [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)] + entries


def _git_blob_sha1(path: str) -> str:
    """The id git gives the file's content, as the hub reports it for non-LFS files."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Handler(BaseHTTPRequestHandler):
    repos: dict[str, Repo] = {}
    token: str | None = None
    rate: float | None = None  # bytes per second per file, to watch a download's progress
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # the request lines below are the log
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        status = 500
        try:
            status = self._route(body)
        finally:
            print(f"REQUEST {time.time():.3f} {self.command} {self.path} {status}", flush=True)

    def _route(self, body: bool) -> int:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = dict(q.split("=", 1) if "=" in q else (q, "") for q in url.query.split("&") if q)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = self._repo(parts[2] + "/" + parts[3])
            if isinstance(repo, int):
                return repo
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                rev = rest[1] if len(rest) > 1 else "main"
                if repo.resolve(rev) is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return self._json(repo.info(), body)
            if rest[0] == "tree" and len(rest) >= 2:
                if repo.resolve(rest[1]) is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rest[1]}")
                entries = repo.tree("/".join(rest[2:]), query.get("recursive", "").lower() in ("1", "true"))
                if entries is None:
                    return self._error(404, "EntryNotFound", f"{'/'.join(rest[2:])} does not exist on {rest[1]}")
                return self._json(entries, body)
            return self._error(404, None, "not an endpoint this mirror serves")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo(parts[0] + "/" + parts[1])
            if isinstance(repo, int):
                return repo
            commit = repo.resolve(parts[3])
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {parts[3]}")
            path = "/".join(parts[4:])
            if path not in repo.files:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {parts[3]}")
            return self._file(repo, path, commit, body)
        return self._error(404, None, "not an endpoint this mirror serves")

    def _repo(self, repo_id: str) -> Repo | int:
        if self.token is not None and self.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted: send a token")
        repo = self.repos.get(repo_id)
        return repo if repo is not None else self._error(404, "RepoNotFound", "Repository not found")

    def _file(self, repo: Repo, path: str, commit: str, body: bool) -> int:
        size, oid = repo.files[path]
        start = 0
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and ranged[6:].split("-")[0].isdigit():
            start = min(int(ranged[6:].split("-")[0]), size)  # a resumed download: bytes=N-
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{oid}"')
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        if body:
            with open(os.path.join(repo.root, path), "rb") as f:
                f.seek(start)
                t0, sent = time.monotonic(), 0
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    if self.rate:
                        time.sleep(max(0.0, sent / self.rate - (time.monotonic() - t0)))
        return 206 if start else 200

    def _json(self, value, body: bool) -> int:
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
        return 200

    def _error(self, status: int, code: str | None, message: str) -> int:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", action="append", required=True, metavar="ORG/NAME=DIR")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed)")
    parser.add_argument("--token", help="require Authorization: Bearer TOKEN (a gated repo)")
    parser.add_argument("--rate", type=float, help="serve each file at most this many MB/s")
    args = parser.parse_args(argv)
    repos = {}
    for spec in args.repo:
        repo_id, _, root = spec.partition("=")
        repos[repo_id] = Repo(repo_id, root)
        print(f"serving {repo_id} from {root}: {len(repos[repo_id].files)} files, commit {repos[repo_id].commit}",
              flush=True)
    Handler.repos, Handler.token = repos, args.token
    Handler.rate = args.rate * 1e6 if args.rate else None
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"LISTENING {server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
