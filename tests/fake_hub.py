"""A loopback stand-in for the Hugging Face Hub: the few endpoints `snapshot_download` calls.

It serves repositories held in memory over plain HTTP on 127.0.0.1, records every request it gets
(method, path, query, headers) so tests can assert what the client asked for, and can be told to
fail in the ways a real download fails: a connection dropped mid-file, a refused token, a missing
repository or revision. It never sends xet headers, so huggingface_hub downloads through plain
HTTP `resolve` URLs, with `Range` requests when it resumes.

Endpoints (what the installed huggingface_hub 2.x asks for; 0.x asks for a subset of them):

- `GET /api/{type}s/{repo}` and `GET /api/{type}s/{repo}/revision/{rev}[?blobs=True]`: repo info,
  JSON with `id`, `sha`, `siblings` (`rfilename`, plus `size`/`blobId`/`lfs` when `blobs` is set).
- `GET /api/{type}s/{repo}/tree/{rev}[/{path}]?recursive=True&expand=False`: the file listing,
  JSON list of `{"type": "file"|"directory", "path", "oid", "size", "lfs"?}`.
- `HEAD` and `GET /{datasets/|spaces/|}{repo}/resolve/{rev}/{path}`: the file, with `X-Repo-Commit`,
  `ETag`, `Content-Length`, `Accept-Ranges`; `Range: bytes=N-` gets a 206 with `Content-Range`.

Uploads (what `HfApi.create_repo` and `upload_folder`/`create_commit` send):

- `POST /api/repos/create` (`{"name", "organization", "type", "visibility"?}`): creates an empty repo,
  409 if it exists (which `exist_ok=True` accepts).
- `POST /api/validate-yaml`: accepts any README front matter (the client checks the card first).
- `POST /api/{type}s/{repo}/preupload/{rev}`: answers `"uploadMode": "regular"` for every file, so the
  client sends each file's bytes base64-encoded inside the commit: no LFS or xet transfer.
- `POST /api/{type}s/{repo}/commit/{rev}`: the NDJSON commit (a header line, then `file` lines); the
  files are stored in the repo (`FakeRepo.files`) and the commit recorded in `FakeHub.commits`.
  `fail_commits(status)` answers the next commits with that status instead.

Errors use the Hub's `X-Error-Code` header (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`),
which is how huggingface_hub tells them apart. huggingface_hub 2.x also fetches an "agent harness"
registry (`GET /api/agent-harnesses`) once a day, from the endpoint it read at import, whatever the
`endpoint` argument says: a process started with HF_ENDPOINT pointing here gets an empty registry.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 10_000  # files at least this large are described as LFS files, as the Hub does for big blobs

_API = re.compile(r"^/api/(?P<type>models|datasets|spaces)/(?P<rest>.+)$")
_UPLOAD = re.compile(r"^(?P<repo>[^/]+/[^/]+)/(?P<action>preupload|commit)/(?P<rev>[^/]+)$")
_RESOLVE = re.compile(r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_id(content: bytes) -> str:
    """The git object id of a file, which the Hub reports as `oid`/`blobId`."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@dataclasses.dataclass
class FakeRepo:
    """One repository: its files at a single commit, reachable by that commit and by each branch name."""

    repo_id: str
    files: dict[str, bytes]
    repo_type: str = "dataset"
    branches: tuple[str, ...] = ("main",)
    commit: str = ""
    deny_status: int | None = None  # answer every request for this repo with 401 or 403

    def __post_init__(self) -> None:
        if not self.commit:
            self.commit = hashlib.sha1(f"{self.repo_type}:{self.repo_id}".encode()).hexdigest()

    def knows_revision(self, revision: str) -> bool:
        return revision in self.branches or revision == self.commit


@dataclasses.dataclass
class RecordedRequest:
    method: str
    path: str  # unquoted, without the query string
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased

    @property
    def range_start(self) -> int | None:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("range", ""))
        return int(match.group(1)) if match else None


@dataclasses.dataclass
class Fault:
    """For the next `times` GETs of repo file `path`: drop the connection after `after_bytes` bytes of
    the body, or (when `status` is set) answer that HTTP status instead of the file."""

    path: str
    times: int
    after_bytes: int = 0
    status: int | None = None


class FakeHub:
    """The server and its state; use as a context manager, or call `start()`/`stop()`."""

    def __init__(self, bytes_per_second: int | None = None) -> None:
        self.bytes_per_second = bytes_per_second  # throttle file bodies, to watch progress or interrupt by hand
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self.commits: list[dict] = []  # each received commit: {"repo_id", "header", "files": {path: bytes}}
        self.commit_failures: list[int] = []  # statuses for the next commits, in order
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, files: dict[str, bytes], repo_type: str = "dataset",
                 **options: object) -> FakeRepo:
        repo = FakeRepo(repo_id, dict(files), repo_type, **options)
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def add_folder(self, repo_id: str, folder: Path, repo_type: str = "dataset", **options: object) -> FakeRepo:
        """Serve every file under `folder`, with its path relative to `folder`."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.add_repo(repo_id, files, repo_type, **options)

    def interrupt(self, path: str, after_bytes: int, times: int = 1) -> None:
        """Make the next `times` downloads of repo file `path` stop after `after_bytes` bytes of body."""
        with self._lock:
            self.faults.append(Fault(path, times, after_bytes=after_bytes))

    def fail(self, path: str, status: int = 503, times: int = 1) -> None:
        """Answer the next `times` downloads of repo file `path` with an HTTP error (after earlier faults)."""
        with self._lock:
            self.faults.append(Fault(path, times, status=status))

    def fail_commits(self, status: int = 500, times: int = 1) -> None:
        """Answer the next `times` commits with HTTP `status` (nothing is stored)."""
        with self._lock:
            self.commit_failures += [status] * times

    def requests_for(self, method: str, path_suffix: str = "") -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path.endswith(path_suffix)]

    def start(self) -> FakeHub:
        self._server = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.path == path and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None


def closed_port_url() -> str:
    """A loopback URL on which nothing listens: connecting to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hangs up mid-response (Ctrl-C, a test's dropped connection) is not a server bug."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub; every response carries Content-Length
    hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the recorded requests are the log."""

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.hub._record(RecordedRequest("POST", path, parse_qs(parts.query),
                                         {k.lower(): v for k, v in self.headers.items()}))
        match = _API.match(path)
        if path == "/api/repos/create":
            self._create_repo(json.loads(body))
        elif path == "/api/validate-yaml":
            self._json({"errors": [], "warnings": []})
        elif match is not None and (upload := _UPLOAD.match(match.group("rest"))) is not None:
            repo = self._repo(match.group("type")[:-1], upload.group("repo"))
            if repo is None or not self._revision_ok(repo, upload.group("rev")):
                return
            if upload.group("action") == "preupload":
                files = json.loads(body)["files"]
                self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                      for f in files]})
            else:
                self._commit(repo, body)
        else:
            self._error(404, "Not Found", "no such endpoint on the fake hub")

    # --- uploads ---------------------------------------------------------------------------------

    def _create_repo(self, payload: dict) -> None:
        repo_type = payload.get("type") or "model"
        repo_id = "/".join(part for part in (payload.get("organization"), payload["name"]) if part)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.hub.url}/{prefix}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:  # the Hub's 409 carries the URL too
            self._json({"error": "You already created this model repo", "url": url}, status=409)
            return
        self.hub.add_repo(repo_id, {}, repo_type)
        self._json({"url": url, "name": repo_id})

    def _commit(self, repo: FakeRepo, body: bytes) -> None:
        with self.hub._lock:
            status = self.hub.commit_failures.pop(0) if self.hub.commit_failures else None
        if status is not None:
            self._error(status, None, "Internal Error")
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                 for line in lines if line["key"] == "file"}
        repo.files.update(files)
        repo.commit = hashlib.sha1(f"{repo.commit}:{len(self.hub.commits)}".encode()).hexdigest()
        with self.hub._lock:
            self.hub.commits.append({"repo_id": repo.repo_id, "header": header, "files": files})
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        self._json({"commitUrl": f"{self.hub.url}/{prefix}{repo.repo_id}/commit/{repo.commit}",
                    "commitOid": repo.commit, "pullRequestUrl": None})

    def _dispatch(self, send_body: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        request = RecordedRequest(self.command, path, parse_qs(parts.query),
                                  {k.lower(): v for k, v in self.headers.items()})
        self.hub._record(request)
        if path == "/api/agent-harnesses":
            self._json({"standardEnvVars": [], "harnesses": {}})
        elif (match := _API.match(path)) is not None and self.command == "GET":
            self._api(match.group("type")[:-1], match.group("rest"), request)
        elif (match := _RESOLVE.match(path)) is not None:
            repo_type = (match.group("type") or "models")[:-1]
            self._resolve(repo_type, match.group("repo"), match.group("rev"), match.group("path"), request, send_body)
        else:
            self._error(404, "Not Found", "no such endpoint on the fake hub")

    # --- API -------------------------------------------------------------------------------------

    def _api(self, repo_type: str, rest: str, request: RecordedRequest) -> None:
        segments = rest.split("/")
        repo_id, tail = "/".join(segments[:2]), segments[2:]
        repo = self._repo(repo_type, repo_id)
        if repo is None:
            return
        if not tail:
            self._repo_info(repo, "main", request)
        elif tail[0] == "revision" and len(tail) >= 2:
            self._repo_info(repo, "/".join(tail[1:]), request)
        elif tail[0] == "tree" and len(tail) >= 2:
            self._tree(repo, tail[1], "/".join(tail[2:]))
        else:
            self._error(404, "Not Found", f"unknown API path {rest}")

    def _repo_info(self, repo: FakeRepo, revision: str, request: RecordedRequest) -> None:
        if not self._revision_ok(repo, revision):
            return
        with_blobs = request.query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, content in sorted(repo.files.items()):
            sibling: dict = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(content), blobId=git_blob_id(content))
                if len(content) >= LFS_THRESHOLD:
                    sibling["lfs"] = {"sha256": sha256_hex(content), "size": len(content), "pointerSize": 134}
            siblings.append(sibling)
        self._json({
            "_id": "0" * 24, "id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": repo.commit,
            "private": False, "gated": False, "disabled": False, "lastModified": "2024-01-01T00:00:00.000Z",
            "tags": [], "downloads": 0, "likes": 0, "siblings": siblings,
        })

    def _tree(self, repo: FakeRepo, revision: str, folder: str) -> None:
        if not self._revision_ok(repo, revision):
            return
        prefix = f"{folder.rstrip('/')}/" if folder else ""
        entries: list[dict] = []
        folders: set[str] = set()
        for path, content in sorted(repo.files.items()):
            if not path.startswith(prefix):
                continue
            parents = path.split("/")[:-1]
            for depth in range(1, len(parents) + 1):
                folders.add("/".join(parents[:depth]))
            entry: dict = {"type": "file", "oid": git_blob_id(content), "size": len(content), "path": path}
            if len(content) >= LFS_THRESHOLD:
                entry["lfs"] = {"oid": sha256_hex(content), "size": len(content), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                    for f in sorted(folders) if f.startswith(prefix)]
        self._json(entries)

    # --- files -----------------------------------------------------------------------------------

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str, request: RecordedRequest,
                 send_body: bool) -> None:
        repo = self._repo(repo_type, repo_id)
        if repo is None or not self._revision_ok(repo, revision):
            return
        content = repo.files.get(path)
        if content is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on {revision}",
                        extra={"X-Repo-Commit": repo.commit})
            return
        fault = self.hub._take_fault(path) if send_body else None
        if fault is not None and fault.status is not None:
            self._error(fault.status, None, "Service Unavailable")
            return
        size = len(content)
        start = request.range_start or 0
        if start >= size and size > 0:
            self._error(416, "RangeNotSatisfiable", "range not satisfiable",
                        extra={"Content-Range": f"bytes */{size}"})
            return
        body = content[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", repo.commit)
        etag = sha256_hex(content) if size >= LFS_THRESHOLD else git_blob_id(content)
        self.send_header("ETag", f'"{etag}"')
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        if not send_body:
            return
        if fault is None:
            self._send_body(body)
            return
        self._send_body(body[:fault.after_bytes])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    # --- helpers ---------------------------------------------------------------------------------

    def _send_body(self, body: bytes) -> None:
        rate = self.hub.bytes_per_second
        if rate is None:
            self.wfile.write(body)
            return
        chunk = max(1, rate // 20)
        for start in range(0, len(body), chunk):
            self.wfile.write(body[start:start + chunk])
            self.wfile.flush()
            time.sleep(chunk / rate)

    def _repo(self, repo_type: str, repo_id: str) -> FakeRepo | None:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.deny_status == 401:
            self._error(401, None, "Invalid credentials in Authorization header")
            return None
        if repo.deny_status == 403:
            self._error(403, None, "Access to this repository is restricted")
            return None
        return repo

    def _revision_ok(self, repo: FakeRepo, revision: str) -> bool:
        if repo.knows_revision(revision):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return False

    def _json(self, payload: object, status: int = 200) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if code is not None:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

