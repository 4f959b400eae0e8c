"""A local server speaking the Hugging Face Hub's HTTP API, for tests and benchmarks without a hub.

The real ``huggingface_hub`` client (``snapshot_download``, ``hf_hub_download``, ``HfApi``, the ``hf download``
CLI) works against it unchanged: point it at the server with ``endpoint=`` or ``HF_ENDPOINT``. Repos (models and
datasets) have git-like history: every ``commit`` makes a new 40-hex commit on a branch, and every older commit
stays downloadable by its sha. File contents are stored once, content-addressed, under the server's root directory
and streamed in chunks, so files of any size work; a server restarted on the same root serves the same commits.

What the client sees is what the Hub sends it:

- ``GET /api/{models,datasets}/REPO[/revision/REV]`` (``?blobs=true`` adds sizes, blob ids and LFS metadata),
  ``/tree/REV[/PATH]`` (``?recursive=true``, paginated with a ``Link: rel="next"`` header), ``/refs``,
  ``/commits/REV`` and ``POST .../paths-info/REV``;
- ``HEAD``/``GET /[datasets/]REPO/resolve/REV/PATH`` with ``X-Repo-Commit``, ``ETag`` (the git blob sha1, or the
  sha256 for LFS files, which also get ``X-Linked-Etag`` and ``X-Linked-Size``), ``Accept-Ranges`` and
  ``Content-Length``; a ``Range:`` request gets ``206`` with ``Content-Range`` (``416`` when unsatisfiable);
- errors as ``404`` with ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``, and ``401``
  when a token is configured and the request does not carry it, so the client raises its own exceptions.

Files of ``LFS_SIZE_THRESHOLD`` bytes or more, and files matching ``LFS_PATTERNS`` (``*.safetensors``, ``*.bin``,
...), are LFS files; the others are regular git blobs. Xet storage is never advertised: downloads are plain HTTP.

Test controls: ``rate_limit`` (bytes per second of each response, so of each connection, which carries one at a
time: it makes a kill land mid-file), a request log (a ``RequestRecord`` per request: method, path, Range header,
status, bytes sent, bearer token) and ``HubServer.drop_next_download`` (close the connection after N bytes of the
next download of a file).

The client's side (huggingface_hub 1.33.0): it resumes only within one download call. When the body ends early or
a connection cannot be made, it retries (5 times in a row at most, 1 s apart) with ``Range: bytes=N-``, N being
what it has written to disk, in whole 10 MiB chunks; a reset connection is not retried. A new process starts over:
its partial file has a unique name, and is deleted when a download fails.

Embedded::

    with HubServer(tmp_path / "hub") as hub:          # port 0: an ephemeral port; hub.url is the endpoint
        sha = hub.repos.commit("org/model", {"config.json": b"{}", "model.safetensors": weights_path})
        snapshot_download("org/model", revision=sha, endpoint=hub.url, cache_dir=tmp_path / "cache")
        hub.request_log()                             # [RequestRecord(...), ...]

As a process (prints ``serving http://HOST:PORT`` once ready; appends its request log to ROOT/requests.jsonl)::

    python tests/hubserver.py serve --root DIR --host 127.0.0.1 --port 0 [--rate BYTES_PER_S] [--token T]
    python tests/hubserver.py commit --root DIR --repo-id org/model [--repo-type dataset] [--branch main] \\
        --folder LOCAL_DIR                            # prints the new commit's sha

``ServerProcess`` starts that ``serve`` command from Python and waits for its URL (tests that SIGKILL a server).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import fnmatch
import functools
import hashlib
import hmac
import json
import os
import re
import select
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

LFS_SIZE_THRESHOLD = 1024 * 1024
# The Hub's default .gitattributes: files matching these are stored with LFS whatever their size.
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle",
    "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
    "*.zst", "*tfevents*",
)
REPO_TYPES = ("model", "dataset")
DEFAULT_BRANCH = "main"
TREE_PAGE_SIZE = 1000
REQUEST_LOG_FILE = "requests.jsonl"
COMMIT_AUTHOR = "hubserver <hubserver@localhost>"
COPY_CHUNK = 8 * 1024 * 1024
SEND_CHUNK = 4 * 1024 * 1024
STARTUP_TIMEOUT_S = 10.0
SHUTDOWN_POLL_S = 0.05  # how soon serve_forever notices stop()

_SHA1_HEX = re.compile(r"[0-9a-f]{40}")
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_API_ACTIONS = {"revision", "tree", "refs", "paths-info", "commits"}


class HubError(Exception):
    """A request the Hub refuses: ``status`` and ``error_code`` are what it answers with (``X-Error-Code``)."""

    status = 404
    error_code: str | None = None

    def __init__(self, message: str, commit_sha: str | None = None):
        super().__init__(message)
        self.commit_sha = commit_sha  # sent as X-Repo-Commit: the client caches a missing file per commit


class RepoNotFound(HubError):
    error_code = "RepoNotFound"


class RevisionNotFound(HubError):
    error_code = "RevisionNotFound"


class EntryNotFound(HubError):
    error_code = "EntryNotFound"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: the sha1 of ``blob SIZE\\0`` and the content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file committed in place of an LFS file's content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(timestamp: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(timestamp))


def _header_safe(text: str) -> str:
    """HTTP header values must be latin-1: escape anything else (paths in error messages may be unicode)."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


def validate_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if not 1 <= len(parts) <= 2 or not all(_REPO_PART.fullmatch(p) and ".." not in p and "--" not in p
                                           for p in parts):
        raise ValueError(f"not a valid repo id: {repo_id!r} (expected 'name' or 'namespace/name')")
    return repo_id


def validate_path_in_repo(path: str) -> str:
    parts = path.split("/")
    if not path or any(p in ("", ".", "..") for p in parts) or "\0" in path:
        raise ValueError(f"not a valid path in a repo: {path!r}")
    return path


def _check_repo_type(repo_type: str) -> str:
    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type must be one of {REPO_TYPES}, not {repo_type!r}")
    return repo_type


@dataclasses.dataclass(frozen=True)
class RepoFile:
    """One file of a commit. ``blob_id`` is its git oid: of the content, or of the LFS pointer for LFS files."""

    path: str
    size: int
    sha256: str
    blob_id: str
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


@dataclasses.dataclass(frozen=True)
class Commit:
    sha: str
    parents: tuple[str, ...]
    message: str
    timestamp: int
    tree_oid: str
    files: Mapping[str, RepoFile]

    @functools.cached_property
    def directory_oids(self) -> dict[str, str]:
        """Git tree oid of every directory of the commit, by path ('' is the root)."""
        return _tree_oids(self.files)

    def to_json(self) -> dict:
        return {"sha": self.sha, "parents": list(self.parents), "message": self.message,
                "timestamp": self.timestamp, "tree_oid": self.tree_oid,
                "files": [dataclasses.asdict(f) for f in self.files.values()]}

    @classmethod
    def from_json(cls, data: dict) -> Commit:
        files = {f["path"]: RepoFile(**f) for f in data["files"]}
        return cls(sha=data["sha"], parents=tuple(data["parents"]), message=data["message"],
                   timestamp=data["timestamp"], tree_oid=data["tree_oid"], files=files)


def _tree_oids(files: Mapping[str, RepoFile]) -> dict[str, str]:
    # Git tree objects: entries "MODE NAME\0<20-byte oid>", sorted by name with directories compared as "NAME/".
    children: dict[str, dict[str, tuple[str, str | None]]] = {"": {}}
    for path, file in files.items():
        parts = path.split("/")
        for depth in range(len(parts)):
            directory = "/".join(parts[:depth])
            children.setdefault(directory, {})
            if depth < len(parts) - 1:
                children[directory][parts[depth]] = ("40000", None)
            else:
                children[directory][parts[depth]] = ("100644", file.blob_id)
    oids: dict[str, str] = {}
    for directory in sorted(children, key=lambda d: d.count("/") + bool(d), reverse=True):
        entries = []
        for name, (mode, oid) in children[directory].items():
            sub_path = f"{directory}/{name}" if directory else name
            entries.append((name + "/" if mode == "40000" else name, mode, name, oid or oids[sub_path]))
        body = b"".join(f"{mode} {name}\0".encode() + bytes.fromhex(oid)
                        for _, mode, name, oid in sorted(entries, key=lambda e: e[0].encode()))
        oids[directory] = hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()
    return oids


class HubRepos:
    """The repos a server serves, kept on disk under ``root`` (content-addressed blobs, one JSON file per commit).

    Layout: ``root/blobs/SHA256`` holds every file content once; ``root/repos/TYPEs--NAMESPACE--NAME/refs.json``
    holds the branches and tags, and ``.../commits/SHA.json`` each commit's file list. Refs are re-read on every
    lookup, so commits made by another ``HubRepos`` on the same root (another process) are served at once.
    """

    def __init__(self, root: str | os.PathLike, *, lfs_threshold: int = LFS_SIZE_THRESHOLD):
        self.root = Path(root).resolve()
        self.lfs_threshold = lfs_threshold
        self.blobs_dir = self.root / "blobs"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(exist_ok=True)
        self._commit_cache: dict[tuple[Path, str], Commit] = {}
        self._cache_lock = threading.Lock()

    # -- writing ------------------------------------------------------------------------------------------------

    def commit(self, repo_id: str, files: Mapping[str, bytes | os.PathLike], *, repo_type: str = "model",
               branch: str = DEFAULT_BRANCH, message: str = "", delete: Iterable[str] = ()) -> str:
        """Commit ``files`` (path in repo -> content, as bytes or a local file to copy) on ``branch``; return the sha.

        The new commit's tree is the branch head's tree with ``files`` added or replaced and ``delete`` removed; a
        new branch starts from ``main``'s head (from nothing in a new repo, which this creates). The branch moves
        to the new commit; older commits stay readable by sha.
        """
        validate_repo_id(repo_id)
        _check_repo_type(repo_type)
        added = {validate_path_in_repo(path): self._store_blob(path, content) for path, content in files.items()}
        repo_dir = self._repo_dir(repo_type, repo_id)
        with self._write_lock():
            refs = self._read_refs(repo_dir) if repo_dir.exists() else {"branches": {}, "tags": {}}
            parent_sha = refs["branches"].get(branch) or refs["branches"].get(DEFAULT_BRANCH)
            tree = dict(self._load_commit(repo_dir, parent_sha).files) if parent_sha else {}
            for path in delete:
                if tree.pop(path, None) is None:
                    raise ValueError(f"cannot delete {path!r}: not in {repo_id}@{branch}")
            tree.update(added)
            timestamp = int(time.time())
            tree_oid = _tree_oids(tree)[""]
            parents = (parent_sha,) if parent_sha else ()
            text = (f"tree {tree_oid}\n" + "".join(f"parent {p}\n" for p in parents)
                    + f"author {COMMIT_AUTHOR} {timestamp} +0000\ncommitter {COMMIT_AUTHOR} {timestamp} +0000\n"
                    + f"\n{message}\n").encode()
            sha = hashlib.sha1(b"commit %d\0" % len(text) + text).hexdigest()
            commit = Commit(sha=sha, parents=parents, message=message, timestamp=timestamp, tree_oid=tree_oid,
                            files=dict(sorted(tree.items())))
            _write_json(repo_dir / "commits" / f"{sha}.json", commit.to_json())
            refs["branches"][branch] = sha
            _write_json(repo_dir / "refs.json", refs)
        return sha

    def create_tag(self, repo_id: str, tag: str, *, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> str:
        """Tag the commit ``revision`` resolves to; return that commit's sha."""
        repo_dir = self._repo_dir(_check_repo_type(repo_type), validate_repo_id(repo_id))
        with self._write_lock():
            sha = self.resolve(repo_type, repo_id, revision).sha
            refs = self._read_refs(repo_dir)
            refs["tags"][tag] = sha
            _write_json(repo_dir / "refs.json", refs)
        return sha

    def _store_blob(self, path: str, content: bytes | os.PathLike) -> RepoFile:
        tmp = self.blobs_dir / f".tmp-{uuid.uuid4().hex}"
        if isinstance(content, (bytes, bytearray, memoryview)):
            data = bytes(content)
            size, sha256, blob_oid = len(data), hashlib.sha256(data).hexdigest(), git_blob_oid(data)
            tmp.write_bytes(data)
        else:  # streamed: a file of any size, never in memory whole
            size = os.stat(content).st_size
            digest, blob_digest = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
            with open(content, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(COPY_CHUNK):
                    digest.update(chunk)
                    blob_digest.update(chunk)
                    dst.write(chunk)
            if tmp.stat().st_size != size:
                tmp.unlink()
                raise ValueError(f"{content} changed while it was being committed")
            sha256, blob_oid = digest.hexdigest(), blob_digest.hexdigest()
        os.replace(tmp, self.blobs_dir / sha256)
        lfs = size >= self.lfs_threshold or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)
        if lfs:
            blob_oid = git_blob_oid(lfs_pointer(sha256, size))
        return RepoFile(path=path, size=size, sha256=sha256, blob_id=blob_oid, lfs=lfs)

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            yield

    # -- reading ------------------------------------------------------------------------------------------------

    def exists(self, repo_type: str, repo_id: str) -> bool:
        try:
            return (self._repo_dir(repo_type, repo_id) / "refs.json").is_file()
        except ValueError:
            return False

    def refs(self, repo_type: str, repo_id: str) -> dict[str, dict[str, str]]:
        """``{"branches": {name: sha}, "tags": {name: sha}}``; raises ``RepoNotFound``."""
        return self._read_refs(self._existing_repo_dir(repo_type, repo_id))

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> Commit:
        """The commit a branch, tag (also as ``refs/heads/...``, ``refs/tags/...``) or full commit sha names."""
        repo_dir = self._existing_repo_dir(repo_type, repo_id)
        refs = self._read_refs(repo_dir)
        if revision.startswith("refs/heads/"):
            sha = refs["branches"].get(revision.removeprefix("refs/heads/"))
        elif revision.startswith("refs/tags/"):
            sha = refs["tags"].get(revision.removeprefix("refs/tags/"))
        else:
            sha = refs["branches"].get(revision) or refs["tags"].get(revision)
            if sha is None and _SHA1_HEX.fullmatch(revision) and (repo_dir / "commits" / f"{revision}.json").is_file():
                sha = revision
        if sha is None:
            raise RevisionNotFound(f"Invalid rev id: {revision}")
        return self._load_commit(repo_dir, sha)

    def history(self, repo_type: str, repo_id: str, revision: str) -> list[Commit]:
        """The commits reachable from ``revision``, newest first."""
        commit = self.resolve(repo_type, repo_id, revision)
        repo_dir = self._repo_dir(repo_type, repo_id)
        commits = [commit]
        while commits[-1].parents:
            commits.append(self._load_commit(repo_dir, commits[-1].parents[0]))
        return commits

    def blob_path(self, file: RepoFile) -> Path:
        return self.blobs_dir / file.sha256

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        validate_repo_id(repo_id)
        return self.root / "repos" / "--".join([f"{_check_repo_type(repo_type)}s", *repo_id.split("/")])

    def _existing_repo_dir(self, repo_type: str, repo_id: str) -> Path:
        if not self.exists(repo_type, repo_id):
            raise RepoNotFound("Repository not found")
        return self._repo_dir(repo_type, repo_id)

    @staticmethod
    def _read_refs(repo_dir: Path) -> dict[str, dict[str, str]]:
        return json.loads((repo_dir / "refs.json").read_text())

    def _load_commit(self, repo_dir: Path, sha: str) -> Commit:
        key = (repo_dir, sha)
        with self._cache_lock:
            commit = self._commit_cache.get(key)
        if commit is None:
            commit = Commit.from_json(json.loads((repo_dir / "commits" / f"{sha}.json").read_text()))
            with self._cache_lock:
                self._commit_cache[key] = commit
        return commit


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@dataclasses.dataclass
class RequestRecord:
    """One request as the server saw and answered it.

    ``range`` is the request's Range header, ``bytes_sent`` the body bytes written (counted per chunk of up to
    4 MiB), ``complete`` whether the whole body went out (False when the connection broke or was dropped),
    ``bearer_token`` the token the request carried, ``time`` when it arrived (Unix time).
    """

    method: str
    path: str
    query: str
    range: str | None
    bearer_token: str | None
    time: float
    status: int = 0
    bytes_sent: int = 0
    complete: bool = False

    @property
    def is_file_download(self) -> bool:
        """A GET of file content (``/resolve/``), as opposed to API calls and HEAD metadata requests."""
        return self.method == "GET" and "/resolve/" in self.path


def read_request_log(path: str | os.PathLike) -> list[RequestRecord]:
    """The records a ``serve`` process appended to its JSON-lines log (``ROOT/requests.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / REQUEST_LOG_FILE
    if not path.exists():
        return []
    return [RequestRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


@dataclasses.dataclass(frozen=True)
class _Request:
    method: str
    parts: list[str]  # the URL path's segments, still percent-encoded
    params: dict[str, list[str]]
    body: bytes
    bearer_token: str | None
    range: str | None
    host: str | None  # the Host header: how the client reaches us, for absolute URLs in Link headers

    def flag(self, name: str) -> bool:
        return self.params.get(name, ["false"])[-1].lower() in ("1", "true")


@dataclasses.dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    file: tuple[Path, int, int] | None = None  # (path, first byte, length) of a file slice to stream
    file_label: tuple[str, str] | None = None  # (repo id, path in repo), to match drop_next_download faults

    @classmethod
    def json(cls, data: object, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
        return cls(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})},
                   json.dumps(data).encode())

    @classmethod
    def error(cls, status: int, message: str, error_code: str | None = None,
              commit_sha: str | None = None) -> _Response:
        headers = {"X-Error-Message": _header_safe(message)}
        if error_code:
            headers["X-Error-Code"] = error_code
        if commit_sha:
            headers["X-Repo-Commit"] = commit_sha
        return cls.json({"error": message}, status, headers)


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # snapshot_download opens 8 connections at once, several clients more

    def __init__(self, address: tuple[str, int], hub: HubServer):
        self.hub = hub
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _HubRequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can hang for seconds without DNS: skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    server_version = "hubserver"
    server: _HubHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.hub._connection_opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.hub._connection_closed(self.connection)

    def log_message(self, format: str, *args: object) -> None:
        pass  # requests go to the structured request log instead

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        authorization = self.headers.get("Authorization") or ""
        request = _Request(
            method=self.command, parts=url.path.lstrip("/").split("/"), params=parse_qs(url.query),
            body=self.rfile.read(int(self.headers.get("Content-Length") or 0)),
            bearer_token=authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else None,
            range=self.headers.get("Range"), host=self.headers.get("Host"))
        record = RequestRecord(method=self.command, path=url.path, query=url.query, range=request.range,
                               bearer_token=request.bearer_token, time=time.time())
        try:
            try:
                response = hub._route(request)
            except HubError as e:
                response = _Response.error(e.status, str(e), e.error_code, e.commit_sha)
            except Exception as e:  # a bug here: answer it as the Hub's 500, and keep serving
                response = _Response.error(500, f"{type(e).__name__}: {e}")
            self._send(response, record)
        except OSError:
            self.close_connection = True  # the client went away mid-response
        finally:
            hub._log(record)

    def _send(self, response: _Response, record: RequestRecord) -> None:
        record.status = response.status
        length = response.file[2] if response.file else len(response.body)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            record.complete = True
        elif response.file is None:
            self.wfile.write(response.body)
            record.bytes_sent, record.complete = len(response.body), True
        else:
            self._send_file(*response.file, response.file_label, record)

    def _send_file(self, path: Path, start: int, length: int, label: tuple[str, str] | None,
                   record: RequestRecord) -> None:
        hub = self.server.hub
        rate = hub.rate_limit
        drop_after = hub._take_fault(*label) if label else None
        chunk = max(1024, min(256 * 1024, rate // 20)) if rate else SEND_CHUNK
        limit = length if drop_after is None else min(length, drop_after)
        started = time.monotonic()
        with open(path, "rb") as f:
            while record.bytes_sent < limit:
                sent = self.connection.sendfile(f, start + record.bytes_sent, min(chunk, limit - record.bytes_sent))
                if sent == 0:
                    raise BrokenPipeError("the client stopped reading")
                record.bytes_sent += sent
                if rate:
                    ahead = record.bytes_sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        if drop_after is not None:
            # Like a server that dies: FIN, no more bytes (the client sees an incomplete body and resumes).
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        record.complete = record.bytes_sent == length and drop_after is None


class HubServer:
    """An HTTP server answering the Hub API for the repos of ``HubRepos(root)``.

    It binds at construction (``port=0``: an ephemeral port; ``url`` says which), serves once ``start()``ed (in a
    background thread) or ``serve_forever()`` is called, and ``stop()`` closes the listening socket and every open
    connection. ``rate_limit`` (bytes/s per response) and ``token`` (required as ``Authorization: Bearer``) may be
    changed while it runs. Requests are recorded in memory (``request_log()``) and, with ``request_log_path``,
    appended to that file as JSON lines.
    """

    def __init__(self, root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, *,
                 rate_limit: int | None = None, token: str | None = None,
                 request_log_path: str | os.PathLike | None = None, lfs_threshold: int = LFS_SIZE_THRESHOLD,
                 tree_page_size: int = TREE_PAGE_SIZE):
        self.repos = HubRepos(root, lfs_threshold=lfs_threshold)
        self.rate_limit = rate_limit
        self.token = token
        self.tree_page_size = tree_page_size
        self.request_log_path = Path(request_log_path) if request_log_path else None
        self._records: list[RequestRecord] = []
        self._faults: list[tuple[str | None, str, int]] = []
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._httpd = _HubHTTPServer((host, port), self)

    @property
    def host(self) -> str:
        return self._httpd.server_address[0]

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(SHUTDOWN_POLL_S,), name="hubserver",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever(SHUTDOWN_POLL_S)

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def request_log(self) -> list[RequestRecord]:
        """The requests answered so far (a copy), oldest first."""
        with self._lock:
            return list(self._records)

    def clear_request_log(self) -> None:
        with self._lock:
            self._records.clear()

    def drop_next_download(self, path_in_repo: str, after_bytes: int, *, repo_id: str | None = None) -> None:
        """Make the next GET of ``path_in_repo`` (in ``repo_id``, or any repo) send ``after_bytes`` body bytes and
        then close the connection, as a server dying mid-file does. One use per call."""
        with self._lock:
            self._faults.append((repo_id, path_in_repo, after_bytes))

    # -- internals ----------------------------------------------------------------------------------------------

    def _take_fault(self, repo_id: str, path_in_repo: str) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault[1] == path_in_repo and fault[0] in (None, repo_id):
                    self._faults.remove(fault)
                    return fault[2]
        return None

    def _log(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)
            if self.request_log_path is not None:
                with open(self.request_log_path, "a") as f:
                    f.write(json.dumps(dataclasses.asdict(record)) + "\n")

    def _connection_opened(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def _connection_closed(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _route(self, request: _Request) -> _Response:
        parts = request.parts
        if parts == ["api", "agent-harnesses"]:  # public on the Hub; the `hf` CLI fetches it to detect AI agents
            return _Response.json({"standardEnvVars": [], "harnesses": {}})
        token = request.bearer_token
        if self.token is not None and not (token and hmac.compare_digest(token.encode(), self.token.encode())):
            if token is None:  # what the Hub answers for a private repo to a request without a token
                return _Response.error(401, "Invalid username or password.", "RepoNotFound")
            return _Response.error(401, "Invalid credentials in Authorization header")
        if parts[0] == "api" and len(parts) >= 3 and parts[1] in ("models", "datasets"):
            return self._api(request, parts[1].removesuffix("s"), parts[2:])
        repo_type = "model"
        if parts[0] == "datasets":
            repo_type, parts = "dataset", parts[1:]
        for n in (1, 2):  # REPO/resolve/REV/PATH, REPO being "name" or "namespace/name"
            if len(parts) >= n + 3 and parts[n] == "resolve" and request.method in ("GET", "HEAD"):
                return self._resolve(request, repo_type, "/".join(parts[:n]), unquote(parts[n + 1]),
                                     unquote("/".join(parts[n + 2:])))
        return _Response.error(404, "Not Found")

    def _api(self, request: _Request, repo_type: str, rest: list[str]) -> _Response:
        # REPO is "name" or "namespace/name"; what follows it, if anything, is an action.
        candidates = [("/".join(rest[:n]), rest[n:]) for n in (2, 1)
                      if len(rest) >= n and (len(rest) == n or rest[n] in _API_ACTIONS)]
        if not candidates:
            return _Response.error(404, "Not Found")
        repo_id, action = next(((r, a) for r, a in candidates if self.repos.exists(repo_type, r)), candidates[0])
        if not self.repos.exists(repo_type, repo_id):
            raise RepoNotFound("Repository not found")
        name, args = (action[0], [unquote(a) for a in action[1:]]) if action else ("", [])
        if request.method == "POST" and name != "paths-info":
            return _Response.error(405, "Method Not Allowed")
        if name == "" or (name == "revision" and len(args) == 1):
            return self._repo_info(repo_type, repo_id, args[0] if args else DEFAULT_BRANCH, request.flag("blobs"))
        if name == "tree" and args:
            return self._tree(request, repo_type, repo_id, args[0], "/".join(args[1:]))
        if name == "refs" and not args:
            return self._refs(repo_type, repo_id, request.flag("include_prs"))
        if name == "commits" and len(args) == 1:
            return _Response.json([
                {"id": c.sha, "title": c.message.split("\n", 1)[0], "message": c.message, "date": _iso(c.timestamp),
                 "authors": [{"user": COMMIT_AUTHOR.split()[0]}]}
                for c in self.repos.history(repo_type, repo_id, args[0])])
        if name == "paths-info" and len(args) == 1 and request.method == "POST":
            paths = parse_qs(request.body.decode()).get("paths", [])
            return self._paths_info(repo_type, repo_id, args[0], paths)
        return _Response.error(404, "Not Found")

    def _repo_info(self, repo_type: str, repo_id: str, revision: str, files_metadata: bool) -> _Response:
        commit = self.repos.resolve(repo_type, repo_id, revision)
        siblings = []
        for file in commit.files.values():
            sibling: dict = {"rfilename": file.path}
            if files_metadata:
                sibling.update(blobId=file.blob_id, size=file.size)
                if file.lfs:
                    sibling["lfs"] = {"sha256": file.sha256, "size": file.size, "pointerSize": file.pointer_size}
            siblings.append(sibling)
        info = {"id": repo_id, "author": repo_id.split("/")[0] if "/" in repo_id else None, "sha": commit.sha,
                "lastModified": _iso(commit.timestamp), "private": self.token is not None, "gated": False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings}
        if files_metadata:
            info["usedStorage"] = sum(f.size for f in commit.files.values())
        if repo_type == "model":
            info["modelId"] = repo_id
        return _Response.json(info)

    @staticmethod
    def _file_entry(file: RepoFile) -> dict:
        entry: dict = {"type": "file", "oid": file.blob_id, "size": file.size, "path": file.path}
        if file.lfs:
            entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": file.pointer_size}
        return entry

    def _tree(self, request: _Request, repo_type: str, repo_id: str, revision: str, directory: str) -> _Response:
        commit = self.repos.resolve(repo_type, repo_id, revision)
        if directory not in commit.directory_oids:
            raise EntryNotFound(f"{directory} does not exist on {revision}", commit.sha)
        recursive = request.flag("recursive")
        prefix = f"{directory}/" if directory else ""

        def listed(path: str) -> bool:
            return path.startswith(prefix) and path != directory and (recursive or "/" not in path[len(prefix):])

        entries = [{"type": "directory", "oid": oid, "size": 0, "path": path}
                   for path, oid in sorted(commit.directory_oids.items()) if listed(path)]
        entries += [self._file_entry(file) for file in commit.files.values() if listed(file.path)]
        cursor = int(request.params.get("cursor", ["0"])[-1])
        end = cursor + self.tree_page_size
        headers = {}
        if end < len(entries):
            query = urlencode({**{k: v[-1] for k, v in request.params.items()}, "cursor": end})
            base = f"http://{request.host}" if request.host else self.url
            headers["Link"] = f'<{base}/{"/".join(request.parts)}?{query}>; rel="next"'
        return _Response.json(entries[cursor:end], headers=headers)

    def _refs(self, repo_type: str, repo_id: str, include_prs: bool) -> _Response:
        refs = self.repos.refs(repo_type, repo_id)
        data: dict[str, list] = {
            kind: [{"name": name, "ref": f"refs/{prefix}/{name}", "targetCommit": sha}
                   for name, sha in sorted(refs[kind].items())]
            for kind, prefix in (("branches", "heads"), ("tags", "tags"))}
        data["converts"] = []
        if include_prs:
            data["pullRequests"] = []
        return _Response.json(data)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str, paths: list[str]) -> _Response:
        commit = self.repos.resolve(repo_type, repo_id, revision)
        entries = []
        for path in (p.strip("/") for p in paths):
            if path in commit.files:
                entries.append(self._file_entry(commit.files[path]))
            elif path and path in commit.directory_oids:
                entries.append({"type": "directory", "oid": commit.directory_oids[path], "size": 0, "path": path})
        return _Response.json(entries)

    def _resolve(self, request: _Request, repo_type: str, repo_id: str, revision: str,
                 path_in_repo: str) -> _Response:
        if not self.repos.exists(repo_type, repo_id):
            raise RepoNotFound("Repository not found")
        commit = self.repos.resolve(repo_type, repo_id, revision)
        file = commit.files.get(path_in_repo)
        if file is None:
            raise EntryNotFound("Entry not found", commit.sha)
        name = path_in_repo.rsplit("/", 1)[-1]
        ascii_name = name.encode("ascii", "replace").decode().replace("?", "_").replace('"', "_")
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{file.etag}"',
            "X-Repo-Commit": commit.sha,
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{ascii_name}\";",
        }
        if file.lfs:
            headers.update({"X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(file.size)})
        return self._file_response(request, file, self.repos.blob_path(file), headers, (repo_id, file.path))

    @staticmethod
    def _file_response(request: _Request, file: RepoFile, blob: Path, headers: dict[str, str],
                       label: tuple[str, str]) -> _Response:
        start, length, status = 0, file.size, 200
        match = _RANGE.fullmatch(request.range.strip()) if request.range else None
        if match and (match[1] or match[2]):  # one range; anything else (several ranges) gets the whole file
            if match[1]:
                first = int(match[1])
                last = min(int(match[2]), file.size - 1) if match[2] else file.size - 1
            else:
                first, last = max(0, file.size - int(match[2])), file.size - 1
            if first >= file.size or first > last:
                return _Response(416, {"Content-Range": f"bytes */{file.size}"})
            start, length, status = first, last - first + 1, 206
            headers["Content-Range"] = f"bytes {first}-{last}/{file.size}"
        return _Response(status, headers, file=(blob, start, length), file_label=label)


class ServerProcess:
    """``python tests/hubserver.py serve`` as a child process, for tests that kill and restart a server.

    Starting waits for the ``serving URL`` line; ``kill()`` is SIGKILL (in-flight downloads break mid-file),
    ``stop()`` SIGTERM. Its request log is ``read_request_log(root)``, shared by every process on that root.
    """

    def __init__(self, root: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 0,
                 rate_limit: int | None = None, token: str | None = None):
        self.root = Path(root)
        command = [sys.executable, str(Path(__file__).resolve()), "serve", "--root", str(self.root),
                   "--host", host, "--port", str(port)]
        if rate_limit:
            command += ["--rate", str(rate_limit)]
        if token:
            command += ["--token", token]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], STARTUP_TIMEOUT_S)
        line = self.process.stdout.readline() if ready else ""
        if not line.startswith("serving "):
            self.kill()
            raise RuntimeError(f"hubserver did not start within {STARTUP_TIMEOUT_S}s (got {line!r})")
        self.url = line.split()[1]
        self.port = int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        self._end(self.process.kill)

    def stop(self) -> None:
        self._end(self.process.terminate)

    def _end(self, send_signal) -> None:
        if self.process.poll() is None:
            send_signal()
        self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _serve(args: argparse.Namespace) -> None:
    root = Path(args.root)
    server = HubServer(root, args.host, args.port, rate_limit=args.rate, token=args.token,
                       request_log_path=root / REQUEST_LOG_FILE, lfs_threshold=args.lfs_threshold)
    print(f"serving {server.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    server.stop()


def _commit(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    repos = HubRepos(args.root, lfs_threshold=args.lfs_threshold)
    print(repos.commit(args.repo_id, files, repo_type=args.repo_type, branch=args.branch, message=args.message))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the repos under --root over HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="0: an ephemeral port (printed)")
    serve.add_argument("--rate", type=int, help="limit each response to this many bytes per second")
    serve.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every request")
    serve.set_defaults(run=_serve)
    commit = commands.add_parser("commit", help="commit every file under --folder to a repo; print the sha")
    commit.add_argument("--repo-id", required=True)
    commit.add_argument("--repo-type", choices=REPO_TYPES, default="model")
    commit.add_argument("--branch", default=DEFAULT_BRANCH)
    commit.add_argument("--message", default="")
    commit.add_argument("--folder", required=True)
    commit.set_defaults(run=_commit)
    for command in (serve, commit):
        command.add_argument("--root", required=True, help="where repos and blobs are kept")
        command.add_argument("--lfs-threshold", type=int, default=LFS_SIZE_THRESHOLD,
                             help="files this large or larger are LFS files (default: %(default)s)")
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
