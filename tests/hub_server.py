"""A local, in-memory Hugging Face Hub for the publishing tests (Hub publishing issue, item 2).

`LocalHub` serves, on 127.0.0.1 and a free port, the part of the Hub HTTP API that `huggingface_hub` 2.4 and
transformers 5.23 call to publish and to load a checkpoint:

    POST /api/repos/create                                  create_repo (409 when it exists)
    POST /api/validate-yaml                                 README.md metadata check (create_commit, ModelCard.validate)
    POST /api/{type}s/{repo}/preupload/{rev}                upload mode per file: "lfs" for *.safetensors & co, else
                                                            "regular", plus the remote oid so unchanged files are skipped
    POST /{prefix}{repo}.git/info/lfs/objects/batch         LFS batch API, basic transfer (HF_HUB_DISABLE_XET=1)
    PUT  /lfs-upload/{oid}?ticket=...                       the presigned upload URL the batch answer hands out
    POST /{prefix}{repo}.git/info/lfs/objects/verify        LFS verify
    POST /api/{type}s/{repo}/commit/{rev}                   the NDJSON commit: header, file, lfsFile, deletedFile/Folder
    GET  /api/{type}s/{repo}[/revision/{rev}]               model_info / repo_info with `siblings`, `sha`, `cardData`
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]            list_repo_tree (snapshot_download, list_repo_files)
    HEAD/GET /{prefix}{repo}/resolve/{rev}/{path}           file metadata (X-Repo-Commit, ETag, X-Linked-Etag,
                                                            X-Linked-Size, Content-Length) and content (Range aware)
    GET  /api/whoami-v2                                     the token's user

Missing repos, revisions and files are answered with 404 and the `X-Error-Code` the client maps to
`RepositoryNotFoundError`, `RevisionNotFoundError` and `EntryNotFoundError`, so transformers treats optional files
(adapter_config.json, sharded indexes, ...) exactly as on the real Hub. A commit is applied all at once or not at all.
Writes need `Authorization: Bearer <token>`. Requests to anything else are answered 404 and recorded in
`unhandled_requests`, so a test can tell when the client starts calling an endpoint this server does not know.

The client reads `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_DISABLE_XET` when `huggingface_hub` is imported, so point a
*fresh process* at the server with `LocalHub.client_environment()`.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["LocalHub"]

# The Hub stores these with git LFS (its default .gitattributes); anything above 10 MB must be LFS too.
_LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.npz")
_LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_DEFAULT_GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in _LFS_PATTERNS)
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_ID = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob: sha1 over `blob <size>\\0<content>`."""
    return hashlib.sha1(b"blob %d\x00" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class _File:
    """One file of a commit: regular files keep their bytes, LFS files point into the server's LFS store."""

    size: int
    blob_oid: str
    content: bytes | None = None
    lfs_sha256: str | None = None

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.lfs_sha256 or "", self.size))


@dataclass
class _Commit:
    oid: str
    parent: str | None
    summary: str
    files: dict[str, _File]
    date: float = field(default_factory=time.time)


@dataclass
class _Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def resolve(self, revision: str) -> _Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class _HubError(Exception):
    """An HTTP error answer: status, the `X-Error-Code` the client maps to an exception, and a message."""

    def __init__(self, status: int, message: str, error_code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.commit = commit


class LocalHub:
    """In-memory Hub on 127.0.0.1 served by a `ThreadingHTTPServer` in a daemon thread.

    Args:
        token: the only accepted write token (`HF_TOKEN` of the clients); None accepts anonymous writes.
        user: the user the token belongs to (`whoami`), also the namespace of repos created without one.
        max_body_bytes: requests with a larger body are refused with 413 (keeps a runaway client bounded).
        fail_commits_for: repo ids whose commit endpoint answers 500 after the LFS uploads went through, to test
            that a failed publication leaves nothing half-published.

    Use as a context manager, or call `start()` / `stop()`.
    """

    def __init__(
        self,
        *,
        token: str | None = "hf_local_hub_test_token",
        user: str = "local-user",
        max_body_bytes: int = 256 * 1024 * 1024,
        fail_commits_for: Iterable[str] = (),
    ) -> None:
        self.token = token
        self.user = user
        self.max_body_bytes = max_body_bytes
        self.fail_commits_for = set(fail_commits_for)
        self.requests: list[tuple[str, str]] = []
        self.unhandled_requests: list[tuple[str, str]] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lfs: dict[str, bytes] = {}
        self._upload_tickets: dict[str, tuple[str, int]] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> str:
        """Bind 127.0.0.1 on a free port, serve in a daemon thread and return the endpoint URL."""
        if self._server is not None:
            raise RuntimeError("LocalHub is already running; call stop() first.")
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> LocalHub:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not running; call start() first.")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def client_environment(self, hf_home: str) -> dict[str, str]:
        """Environment variables that point a fresh `huggingface_hub` process at this server.

        `hf_home` gets the download cache and the dynamic-module cache, so runs never share state.
        """
        environment = {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_HOME": hf_home,
            "HF_HUB_CACHE": f"{hf_home}/hub",
            "HF_MODULES_CACHE": f"{hf_home}/modules",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_ETAG_TIMEOUT": "30",
            "HF_HUB_DOWNLOAD_TIMEOUT": "30",
        }
        if self.token is not None:
            environment["HF_TOKEN"] = self.token
        return environment

    # ---- state, for assertions ----------------------------------------------------------------------------------

    def repo_ids(self, repo_type: str = "model") -> list[str]:
        with self._lock:
            return sorted(repo_id for kind, repo_id in self._repos if kind == repo_type)

    def commits(self, repo_id: str, repo_type: str = "model") -> list[dict[str, Any]]:
        """The commits of `main`, oldest first: `{"oid", "summary", "files"}` (files: sorted paths)."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            history = []
            oid = repo.branches.get("main")
            while oid is not None:
                commit = repo.commits[oid]
                history.append({"oid": commit.oid, "summary": commit.summary, "files": sorted(commit.files)})
                oid = commit.parent
            return history[::-1]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Path -> content of every file at `revision` (LFS files resolved from the LFS store)."""
        with self._lock:
            commit = self._get_commit(self._get_repo(repo_type, repo_id), revision)
            return {path: self._content(entry) for path, entry in commit.files.items()}

    def lfs_objects(self) -> set[str]:
        with self._lock:
            return set(self._lfs)

    # ---- internals shared by the handlers -----------------------------------------------------------------------

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _get_commit(self, repo: _Repo, revision: str) -> _Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _content(self, entry: _File) -> bytes:
        return entry.content if entry.lfs_sha256 is None else self._lfs[entry.lfs_sha256]

    def _new_commit(self, repo: _Repo, parent: _Commit | None, summary: str, files: dict[str, _File]) -> _Commit:
        digest = hashlib.sha1()
        digest.update((parent.oid if parent else "").encode())
        digest.update(summary.encode())
        digest.update(secrets.token_bytes(8))
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].blob_oid}\n".encode())
        commit = _Commit(oid=digest.hexdigest(), parent=parent.oid if parent else None, summary=summary, files=files)
        repo.commits[commit.oid] = commit
        return commit

    def _is_lfs_path(self, path: str, size: int) -> bool:
        name = path.rsplit("/", 1)[-1]
        return size > _LFS_SIZE_THRESHOLD or any(fnmatch.fnmatch(name, pattern) for pattern in _LFS_PATTERNS)


def _validate_card_metadata(content: str) -> list[str]:
    """What the Hub's YAML validator would reject in a README.md: errors as messages (empty list: valid)."""
    if not content.startswith("---"):
        return []
    parts = content.split("---", 2)
    if len(parts) < 3:
        return ["README.md front matter is not closed by a '---' line"]
    try:
        metadata = yaml.safe_load(parts[1])
    except yaml.YAMLError as error:
        return [f"front matter is not valid YAML: {error}"]
    if metadata is None:
        return []
    if not isinstance(metadata, dict):
        return ["front matter must be a YAML mapping"]
    errors = []
    for key in ("license", "library_name", "pipeline_tag", "model_name"):
        if key in metadata and not isinstance(metadata[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets", "language"):
        value = metadata.get(key)
        if value is not None and not (isinstance(value, str) or _is_string_list(value)):
            errors.append(f'"{key}" must be a string or a list of strings')
    base_model = metadata.get("base_model")
    if base_model is not None and not (isinstance(base_model, str) or _is_string_list(base_model)):
        errors.append('"base_model" must be a repo id or a list of repo ids')
    errors += _validate_model_index(metadata.get("model-index"))
    return errors


def _is_string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _validate_model_index(model_index: Any) -> list[str]:
    if model_index is None:
        return []
    if not isinstance(model_index, list):
        return ['"model-index" must be a list']
    errors = []
    for entry in model_index:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errors.append('"model-index" entries need a "name"')
            continue
        for result in entry.get("results") or []:
            task, dataset, metrics = result.get("task"), result.get("dataset"), result.get("metrics")
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                errors.append('"model-index[].results[].task.type" is required')
            if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), str) for k in ("type", "name")):
                errors.append('"model-index[].results[].dataset" needs "type" and "name"')
            if not isinstance(metrics, list) or not metrics:
                errors.append('"model-index[].results[].metrics" must be a non-empty list')
                continue
            for metric in metrics:
                if not isinstance(metric, dict) or not isinstance(metric.get("type"), str) or "value" not in metric:
                    errors.append('every metric needs "type" and "value"')
    return errors


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the `LocalHub` bound as the class attribute `hub`."""

    hub: LocalHub
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 60  # seconds a connection may sit idle or half-sent before the thread gives up on it

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # keep pytest output clean; `LocalHub.requests` records every request instead

    # ---- plumbing -----------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        self._body_consumed = False
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        with self.hub._lock:
            self.hub.requests.append((method, self.path))
        try:
            for route_method, pattern, handler_name in _ROUTES:
                match = pattern.fullmatch(url.path)
                if match and (route_method == method or (route_method == "GET" and method == "HEAD")):
                    groups = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    getattr(self, handler_name)(method, **groups)
                    return
            with self.hub._lock:
                self.hub.unhandled_requests.append((method, self.path))
            raise _HubError(404, f"LocalHub does not serve {method} {url.path}")
        except _HubError as error:
            self._send_error(error, method)

    def _read_body(self) -> bytes:
        self._body_consumed = True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > self.hub.max_body_bytes:
                    raise _HubError(413, f"request body larger than {self.hub.max_body_bytes} bytes")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body_bytes:
            self.close_connection = True
            raise _HubError(413, f"request body larger than {self.hub.max_body_bytes} bytes")
        return self.rfile.read(length)

    def _json_body(self) -> Any:
        try:
            return json.loads(self._read_body() or b"null")
        except json.JSONDecodeError as error:
            raise _HubError(400, f"body is not JSON: {error}") from None

    def _send(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        method: str = "GET",
        content_length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, method: str = "GET", **kwargs: Any) -> None:
        self._send(status, json.dumps(payload).encode(), method=method, **kwargs)

    def _send_error(self, error: _HubError, method: str) -> None:
        if not self._body_consumed and (self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding")):
            # An unread request body would be parsed as the next request on this keep-alive connection.
            self.close_connection = True
        headers = {"X-Error-Message": str(error)}
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        if error.commit:
            headers["X-Repo-Commit"] = error.commit
        self._send_json({"error": str(error)}, error.status, method=method, headers=headers)

    def _require_write_token(self) -> None:
        if self.hub.token is None:
            return
        if self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            raise _HubError(401, "Invalid credentials in Authorization header")

    def _readable_repo(self, kind: str, repo_id: str) -> _Repo:
        repo = self.hub._get_repo(_REPO_TYPES.get(kind, kind), repo_id)
        if repo.private and self.hub.token is not None:
            if self.headers.get("Authorization") != f"Bearer {self.hub.token}":
                raise _HubError(401, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    # ---- API ----------------------------------------------------------------------------------------------------

    def whoami(self, method: str) -> None:
        self._require_write_token()
        self._send_json(
            {"type": "user", "name": self.hub.user, "orgs": [], "auth": {"accessToken": {"role": "write"}}},
            method=method,
        )

    def create_repo(self, method: str) -> None:
        self._require_write_token()
        payload = self._json_body() or {}
        name, namespace = payload.get("name"), payload.get("organization") or self.hub.user
        repo_type = payload.get("type") or "model"
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or repo_type not in _URL_PREFIXES:
            raise _HubError(400, f"invalid repo name or type: {name!r} ({repo_type!r})")
        repo_id = f"{namespace}/{name}"
        url = f"{self.hub.endpoint}/{_URL_PREFIXES[repo_type]}{repo_id}"
        with self.hub._lock:
            if (repo_type, repo_id) in self.hub._repos:
                self._send_json({"error": "You already created this model repo", "url": url}, 409, method=method)
                return
            repo = _Repo(repo_id, repo_type, private=payload.get("visibility") == "private" or payload.get("private"))
            # Like the real Hub, a new repo starts with one commit holding the default .gitattributes.
            attributes = _DEFAULT_GITATTRIBUTES.encode()
            gitattributes = _File(len(attributes), git_blob_oid(attributes), content=attributes)
            commit = self.hub._new_commit(repo, None, "initial commit", {".gitattributes": gitattributes})
            repo.branches["main"] = commit.oid
            self.hub._repos[(repo_type, repo_id)] = repo
        self._send_json({"url": url, "name": repo_id, "id": secrets.token_hex(12)}, method=method)

    def validate_yaml(self, method: str) -> None:
        payload = self._json_body() or {}
        errors = _validate_card_metadata(payload.get("content") or "")
        body = {"errors": [{"message": message} for message in errors], "warnings": []}
        self._send_json(body, 400 if errors else 200, method=method)

    def preupload(self, method: str, kind: str, repo: str, revision: str) -> None:
        self._require_write_token()
        payload = self._json_body() or {}
        with self.hub._lock:
            current = self.hub._get_commit(self._readable_repo(kind, repo), revision)
            answers = []
            for item in payload.get("files", []):
                path, size = item["path"], int(item["size"])
                lfs = self.hub._is_lfs_path(path, size)
                existing = current.files.get(path)
                remote_oid = None
                if existing is not None:
                    remote_oid = existing.lfs_sha256 if existing.lfs_sha256 else existing.blob_oid
                answers.append(
                    {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": remote_oid}
                )
        self._send_json({"files": answers, "commitOid": current.oid}, method=method)

    def lfs_batch(self, method: str, prefix: str | None, repo: str) -> None:
        self._require_write_token()
        payload = self._json_body() or {}
        kind = {"datasets/": "datasets", "spaces/": "spaces"}.get(prefix or "", "models")
        self._readable_repo(kind, repo)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise _HubError(400, "only the 'upload' operation with the 'basic' transfer is supported")
        objects = []
        with self.hub._lock:
            for item in payload.get("objects", []):
                oid, size = item["oid"], int(item["size"])
                answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if size > self.hub.max_body_bytes:
                    answer["error"] = {"code": 422, "message": f"object larger than {self.hub.max_body_bytes} bytes"}
                elif oid not in self.hub._lfs:
                    ticket = secrets.token_urlsafe(16)
                    self.hub._upload_tickets[ticket] = (oid, size)
                    verify_url = f"{self.hub.endpoint}/{prefix or ''}{repo}.git/info/lfs/objects/verify"
                    answer["actions"] = {
                        "upload": {"href": f"{self.hub.endpoint}/lfs-upload/{oid}?ticket={ticket}"},
                        "verify": {"href": verify_url},
                    }
                objects.append(answer)
        self._send_json(
            {"transfer": "basic", "objects": objects}, method=method, content_type="application/vnd.git-lfs+json"
        )

    def lfs_upload(self, method: str, oid: str) -> None:
        ticket = self.query.get("ticket", "")
        with self.hub._lock:
            expected = self.hub._upload_tickets.pop(ticket, None)
        if expected is None or expected[0] != oid:
            raise _HubError(403, "missing or expired upload ticket")
        content = self._read_body()
        if len(content) != expected[1] or hashlib.sha256(content).hexdigest() != oid:
            raise _HubError(400, f"uploaded content does not match oid {oid} / size {expected[1]}")
        with self.hub._lock:
            self.hub._lfs[oid] = content
        self._send(200, method=method)

    def lfs_verify(self, method: str, prefix: str | None, repo: str) -> None:
        self._require_write_token()
        payload = self._json_body() or {}
        with self.hub._lock:
            stored = self.hub._lfs.get(payload.get("oid", ""))
        if stored is None or len(stored) != payload.get("size"):
            raise _HubError(404, f"LFS object {payload.get('oid')} was not uploaded")
        self._send_json({"oid": payload["oid"], "size": len(stored)}, method=method)

    def commit(self, method: str, kind: str, repo: str, revision: str) -> None:
        self._require_write_token()
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        with self.hub._lock:
            target = self._readable_repo(kind, repo)
            if revision not in target.branches:
                raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            parent = target.commits[target.branches[revision]]
            expected_parent = header.get("parentCommit")
            if expected_parent and not parent.oid.startswith(expected_parent):
                raise _HubError(412, f"A commit has happened since {expected_parent}; the head is {parent.oid}")
            files = dict(parent.files)
            # Validate every operation before changing anything: a commit is all or nothing.
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if not path or path.startswith("/") or ".." in path.split("/"):
                    raise _HubError(400, f"invalid path in commit: {path!r}")
                if key == "file":
                    content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else b""
                    files[path] = _File(len(content), git_blob_oid(content), content=content)
                elif key == "lfsFile":
                    stored = self.hub._lfs.get(value.get("oid", ""))
                    if stored is None or len(stored) != value.get("size"):
                        raise _HubError(400, f"LFS object for {path} ({value.get('oid')}) was never uploaded")
                    pointer = _lfs_pointer(value["oid"], len(stored))
                    files[path] = _File(len(stored), git_blob_oid(pointer), lfs_sha256=value["oid"])
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for name in [name for name in files if name.startswith(prefix)]:
                        del files[name]
                else:
                    raise _HubError(400, f"unsupported commit operation {key!r}")
            if target.repo_id in self.hub.fail_commits_for:
                raise _HubError(500, "commit failed (LocalHub fault injection)")
            new_commit = self.hub._new_commit(target, parent, header.get("summary", ""), files)
            target.branches[revision] = new_commit.oid
        url = f"{self.hub.endpoint}/{_URL_PREFIXES[target.repo_type]}{target.repo_id}/commit/{new_commit.oid}"
        self._send_json(
            {"success": True, "commitOid": new_commit.oid, "commitUrl": url, "pullRequestUrl": None}, method=method
        )

    def repo_info(self, method: str, kind: str, repo: str, revision: str | None = None) -> None:
        with self.hub._lock:
            target = self._readable_repo(kind, repo)
            commit = self.hub._get_commit(target, revision or "main")
            readme = commit.files.get("README.md")
            card_data = _front_matter(self.hub._content(readme)) if readme else {}
            config_file = commit.files.get("config.json")
            config = _config_summary(self.hub._content(config_file)) if config_file else None
            siblings = [_sibling(path, entry) for path, entry in sorted(commit.files.items())]
        tags = list(card_data.get("tags") or []) if isinstance(card_data.get("tags"), list) else []
        created = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(target.created))
        info = {
            "_id": hashlib.sha1(target.repo_id.encode()).hexdigest()[:24],
            "id": target.repo_id,
            "author": target.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": bool(target.private),
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "library_name": card_data.get("library_name"),
            "pipeline_tag": card_data.get("pipeline_tag"),
            "cardData": card_data or None,
            "config": config,
            "siblings": siblings,
            "createdAt": created,
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.date)),
        }
        self._send_json(info, method=method)

    def tree(self, method: str, kind: str, repo: str, revision: str, path: str | None = None) -> None:
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        with self.hub._lock:
            commit = self.hub._get_commit(self._readable_repo(kind, repo), revision)
            prefix = (path.strip("/") + "/") if path else ""
            if prefix and not any(name.startswith(prefix) for name in commit.files):
                raise _HubError(404, f"{path} does not exist on {revision}", "EntryNotFound", commit=commit.oid)
            entries: dict[str, dict[str, Any]] = {}
            for name, entry in sorted(commit.files.items()):
                if not name.startswith(prefix):
                    continue
                relative = name[len(prefix) :].split("/")
                folders = relative[:-1] if recursive else relative[:1] if len(relative) > 1 else []
                # Folders get a made-up but stable tree id; clients only carry it around.
                for depth in range(len(folders)):
                    folder = prefix + "/".join(relative[: depth + 1])
                    entries.setdefault(
                        folder, {"type": "directory", "oid": git_blob_oid(folder.encode()), "path": folder}
                    )
                if recursive or len(relative) == 1:
                    entries[name] = {"type": "file", **_tree_file(name, entry)}
        self._send_json(list(entries.values()), method=method)

    def resolve(self, method: str, prefix: str | None, repo: str, revision: str, path: str) -> None:
        kind = {"datasets/": "datasets", "spaces/": "spaces"}.get(prefix or "", "models")
        with self.hub._lock:
            commit = self.hub._get_commit(self._readable_repo(kind, repo), revision)
            entry = commit.files.get(path)
            if entry is None:
                raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=commit.oid)
            content = self.hub._content(entry)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.blob_oid}"', "Accept-Ranges": "bytes"}
        if entry.lfs_sha256 is not None:
            # On the Hub these come with the redirect to the CDN; the client caches LFS blobs under this etag.
            headers["X-Linked-Etag"] = f'"{entry.lfs_sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        status, body = 200, content
        byte_range = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if byte_range and method == "GET":
            start = int(byte_range.group(1))
            end = int(byte_range.group(2)) if byte_range.group(2) else len(content) - 1
            if start >= len(content) and len(content) > 0:
                raise _HubError(416, f"range start {start} beyond {len(content)} bytes")
            body = content[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(content)}"
        self._send(status, body, content_type="application/octet-stream", headers=headers, method=method)


def _front_matter(content: bytes) -> dict[str, Any]:
    text = content.decode("utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    parts = text.split("---", 2)
    try:
        metadata = yaml.safe_load(parts[1]) if len(parts) == 3 else None
    except yaml.YAMLError:
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _config_summary(content: bytes) -> dict[str, Any] | None:
    try:
        config = json.loads(content)
    except json.JSONDecodeError:
        return None
    if not isinstance(config, dict):
        return None
    return {key: config[key] for key in ("architectures", "model_type", "auto_map") if key in config}


def _sibling(path: str, entry: _File) -> dict[str, Any]:
    sibling: dict[str, Any] = {"rfilename": path, "size": entry.size, "blobId": entry.blob_oid}
    if entry.lfs_sha256 is not None:
        sibling["lfs"] = {"size": entry.size, "sha256": entry.lfs_sha256, "pointerSize": entry.pointer_size}
    return sibling


def _tree_file(path: str, entry: _File) -> dict[str, Any]:
    item: dict[str, Any] = {"oid": entry.blob_oid, "size": entry.size, "path": path}
    if entry.lfs_sha256 is not None:
        item["lfs"] = {"oid": entry.lfs_sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return item


_PREFIX = r"(?P<prefix>datasets/|spaces/)?"
_KIND = r"(?P<kind>models|datasets|spaces)"
_ROUTES = [
    ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/{_KIND}/{_REPO_ID}/preupload/(?P<revision>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/{_KIND}/{_REPO_ID}/commit/(?P<revision>[^/]+)"), "commit"),
    ("GET", re.compile(rf"/api/{_KIND}/{_REPO_ID}/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?"), "tree"),
    ("GET", re.compile(rf"/api/{_KIND}/{_REPO_ID}(?:/revision/(?P<revision>[^/]+))?"), "repo_info"),
    ("POST", re.compile(rf"/{_PREFIX}{_REPO_ID}\.git/info/lfs/objects/batch"), "lfs_batch"),
    ("POST", re.compile(rf"/{_PREFIX}{_REPO_ID}\.git/info/lfs/objects/verify"), "lfs_verify"),
    ("PUT", re.compile(r"/lfs-upload/(?P<oid>[0-9a-f]{64})"), "lfs_upload"),
    ("GET", re.compile(rf"/{_PREFIX}{_REPO_ID}/resolve/(?P<revision>[^/]+)/(?P<path>.+)"), "resolve"),
]
