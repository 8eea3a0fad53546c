"""A small Hub-compatible HTTP server for tests: the routes huggingface_hub uses to create a
model repository, upload a folder to it, and download it again.

Everything lives in memory. As on the Hub, weight files (*.safetensors and the like) go through
Git LFS: the preupload answer for them is "lfs", the client asks the LFS batch endpoint where to
put each object, PUTs it there, has it verified, and the commit names it by sha256; every other
file is "regular" and travels inline in the commit. The Hub's newer Xet storage is not served:
clients talk to this server with HF_HUB_DISABLE_XET=1 (hub_env sets it), which is how
huggingface_hub uploads without hf_xet. Tokens map to user names; a user may write to their own namespace and
to the organisations they belong to; private repositories are visible to their namespace's
members only, as on the Hub (anyone else gets 404).

Routes:
    POST /api/repos/create                              create_repo
    POST /api/validate-yaml                             a README.md's front matter, before upload
    POST /api/models/{repo}/branch/{branch}             create_branch
    POST /api/models/{repo}/preupload/{revision}        upload modes
    POST /api/models/{repo}/commit/{revision}           commit (ndjson body: file, lfsFile, deletedFile)
    POST /{repo}.git/info/lfs/objects/batch             where to upload each LFS object (basic transfer)
    PUT  /lfs/objects/{sha256}                          an LFS object's bytes
    POST /lfs/verify/{sha256}                           that it arrived whole
    GET  /api/models/{repo}[/revision/{revision}]       model_info / repo_info
    GET  /api/models/{repo}/tree/{revision}[/{path}]    list_repo_tree
    HEAD /{repo}/resolve/{revision}/{path}              file metadata (X-Repo-Commit, ETag)
    GET  /{repo}/resolve/{revision}/{path}              file content
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")  # the Hub's .gitattributes


def stored_in_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def lfs_info(content: bytes) -> dict:
    """What the tree listing says of an LFS file: its sha256, size, and the size of the pointer
    git stores in its place."""
    oid = hashlib.sha256(content).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(content)}\n"
    return {"oid": oid, "size": len(content), "pointerSize": len(pointer)}


def git_blob_sha1(content: bytes) -> str:
    """The id git gives a file's content (the Hub's ETag for files stored in git)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    namespace: str
    private: bool
    gated: bool = False  # readable only by its namespace's members, as if they accepted its conditions
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit id
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit id -> files

    def commit_id(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass
class HubState:
    tokens: dict[str, str]  # token -> user name
    organisations: dict[str, set[str]] = field(default_factory=dict)  # organisation -> members
    repos: dict[str, Repo] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.organisations.get(namespace, set()))

    def add_repo(self, repo_id: str, private: bool = False, gated: bool = False, files: dict | None = None) -> Repo:
        """A repository with one initial commit on main (empty, as the Hub creates it, or `files`)."""
        initial = hashlib.sha1(f"initial {repo_id}".encode()).hexdigest()
        repo = Repo(
            namespace=repo_id.split("/")[0], private=private, gated=gated, branches={"main": initial},
            commits={initial: dict(files or {})},
        )
        self.repos[repo_id] = repo
        return repo


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    # ------------------------------------------------------------------ plumbing

    def log_message(self, format, *args):  # keep test output clean
        pass

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        parts = [unquote(p) for p in path.strip("/").split("/")]
        self._body = self._read_body()
        try:
            user = self._user()
            status, headers, body = self._route(method, parts, user)
        except HubError as e:
            headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {})}
            status, body = e.status, json.dumps({"error": e.message}).encode()
            if e.status == 409 and getattr(e, "url", None):
                body = json.dumps({"error": e.message, "url": e.url}).encode()
        with self.server.state.lock:
            self.server.state.requests.append((method, path, status))
        self.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        headers["Content-Length"] = str(len(body))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # a streamed upload
            body = bytearray()
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return bytes(body)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.server.state.tokens.get(token)
        if user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return user

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # ------------------------------------------------------------------ routes

    def _route(self, method: str, parts: list[str], user: str | None):
        state = self.server.state
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(user)
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml()
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                return self._create_branch(self._repo(repo_id, user, write=True), rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(self._repo(repo_id, user, write=True), rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(repo_id, self._repo(repo_id, user, write=True), rest[1])
            if method == "GET" and rest in ([], ["revision", *rest[1:2]]) and len(rest) in (0, 2):
                return self._model_info(repo_id, self._repo(repo_id, user), rest[1] if rest else "main")
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(self._repo(repo_id, user), rest[1], "/".join(rest[2:]))
        if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            repo_id = f"{parts[0]}/{parts[1].removesuffix('.git')}"
            return self._lfs_batch(self._repo(repo_id, user, write=True))
        if parts[:2] == ["lfs", "objects"] and method == "PUT" and len(parts) == 3:
            return self._lfs_put(parts[2])
        if parts[:2] == ["lfs", "verify"] and method == "POST" and len(parts) == 3:
            return self._lfs_verify(parts[2], user)
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            repo_id = "/".join(parts[:2])
            return self._resolve(self._repo(repo_id, user), parts[3], "/".join(parts[4:]), method)
        del state
        raise HubError(404, f"no route for {method} {self.path}")

    def _repo(self, repo_id: str, user: str | None, write: bool = False) -> Repo:
        state = self.server.state
        repo = state.repos.get(repo_id)
        member = repo is not None and state.can_write(user, repo.namespace)
        if repo is None or (repo.private and not member):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.gated and not member:
            # the Hub: 401 without a token, 403 with one that has not been granted access
            raise HubError(401 if user is None else 403, f"Access to model {repo_id} is restricted", "GatedRepo")
        if write and not member:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> str:
        commit = repo.commit_id(revision)
        if commit is None:
            raise HubError(404, f"Revision not found: {revision}", "RevisionNotFound")
        return commit

    def _json(self, value, status: int = 200, headers: dict | None = None):
        return status, dict(headers or {}), json.dumps(value).encode()

    def _create_repo(self, user: str | None):
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        payload = json.loads(self._body)
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        url = f"http://{self.headers['Host']}/{repo_id}"
        state = self.server.state
        with state.lock:
            if repo_id in state.repos:
                error = HubError(409, "You already created this model repo")
                error.url = url
                raise error
            if not state.can_write(user, namespace):
                raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace}")
            state.add_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        return self._json({"url": url, "name": repo_id})

    def _validate_yaml(self):
        """The client sends a README.md it uploads here first: its front matter must be a mapping."""
        content = json.loads(self._body)["content"]
        errors = []
        if content.startswith("---\n"):
            try:
                metadata = yaml.safe_load(content[4 : content.index("\n---", 4)])
                if not isinstance(metadata, dict):
                    errors.append({"message": "the front matter is not a mapping"})
            except (ValueError, yaml.YAMLError) as e:
                errors.append({"message": f"the front matter is not valid YAML: {e}"})
        return self._json({"errors": errors, "warnings": []}, status=400 if errors else 200)

    def _create_branch(self, repo: Repo, branch: str):
        payload = json.loads(self._body or b"{}")
        with self.server.state.lock:
            if branch in repo.branches:
                raise HubError(409, f"Branch {branch} already exists")
            repo.branches[branch] = self._commit_of(repo, payload.get("startingPoint") or "main")
        return self._json({})

    def _preupload(self, repo: Repo, revision: str):
        files = repo.commits[self._commit_of(repo, revision)]
        answer = []
        for entry in json.loads(self._body)["files"]:
            existing = files.get(entry["path"])
            answer.append(
                {
                    "path": entry["path"],
                    "uploadMode": "lfs" if stored_in_lfs(entry["path"]) else "regular",
                    "shouldIgnore": False,
                    "oid": None if existing is None else git_blob_sha1(existing),
                }
            )
        return self._json({"files": answer})

    def _commit(self, repo_id: str, repo: Repo, branch: str):
        lines = [json.loads(line) for line in self._body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "a commit starts with its header")
        with self.server.state.lock:
            if branch not in repo.branches:
                raise HubError(404, f"Revision not found: {branch}", "RevisionNotFound")
            parent = repo.branches[branch]
            files = dict(repo.commits[parent])
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, "files are sent base64-encoded")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    content = self.server.state.lfs_objects.get(value["oid"])
                    if value.get("algo") != "sha256" or content is None or len(content) != value["size"]:
                        raise HubError(400, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                    files[value["path"]] = content
                elif line["key"] == "deletedFile":
                    files.pop(value["path"], None)
                else:
                    raise HubError(400, f"this server does not take {line['key']}")
            digest = hashlib.sha1(parent.encode() + json.dumps(lines[0]).encode())
            for path in sorted(files):
                digest.update(path.encode() + git_blob_sha1(files[path]).encode())
            commit = digest.hexdigest()
            repo.commits[commit] = files
            repo.branches[branch] = commit
        url = f"http://{self.headers['Host']}/{repo_id}/commit/{commit}"
        return self._json({"commitUrl": url, "commitOid": commit, "pullRequestUrl": None})

    def _model_info(self, repo_id: str, repo: Repo, revision: str):
        commit = self._commit_of(repo, revision)
        siblings = [{"rfilename": path} for path in sorted(repo.commits[commit])]
        return self._json(
            {"id": repo_id, "modelId": repo_id, "author": repo.namespace, "sha": commit, "private": repo.private,
             "siblings": siblings, "tags": [], "downloads": 0, "likes": 0}
        )

    def _tree(self, repo: Repo, revision: str, folder: str):
        files = repo.commits[self._commit_of(repo, revision)]
        prefix = folder + "/" if folder else ""
        entries = [
            {"type": "file", "path": path, "size": len(content), "oid": git_blob_sha1(content),
             **({"lfs": lfs_info(content)} if stored_in_lfs(path) else {})}
            for path, content in sorted(files.items())
            if path.startswith(prefix)
        ]
        return self._json(entries)

    def _resolve(self, repo: Repo, revision: str, path: str, method: str):
        commit = self._commit_of(repo, revision)
        content = repo.commits[commit].get(path)
        if content is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(content)}"', "Content-Type": "application/octet-stream"}
        if stored_in_lfs(path):  # the Hub names an LFS file by its sha256
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(content).hexdigest()}"', "X-Linked-Size": str(len(content))})
        return 200, headers, content

    # ------------------------------------------------------------------ Git LFS

    def _lfs_batch(self, repo: Repo):
        request = json.loads(self._body)
        if request.get("operation") != "upload" or "basic" not in request.get("transfers", ["basic"]):
            raise HubError(400, "this server takes uploads through the basic transfer only")
        base = f"http://{self.headers['Host']}/lfs"
        objects = []
        for obj in request["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.server.state.lfs_objects:  # else: already stored, nothing to send
                entry["actions"] = {"upload": {"href": f"{base}/objects/{obj['oid']}", "header": {}},
                                    "verify": {"href": f"{base}/verify/{obj['oid']}", "header": {}}}
            objects.append(entry)
        return self._json({"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str):
        if hashlib.sha256(self._body).hexdigest() != oid:
            raise HubError(400, f"the bytes sent are not LFS object {oid}")
        with self.server.state.lock:
            self.server.state.lfs_objects[oid] = self._body
        return self._json({})

    def _lfs_verify(self, oid: str, user: str | None):
        if user is None:
            raise HubError(401, "You must be authenticated to verify an upload")
        stored = self.server.state.lfs_objects.get(oid)
        if stored is None or len(stored) != json.loads(self._body)["size"]:
            raise HubError(404, f"LFS object {oid} is not here")
        return self._json({"message": "Everything is good"})


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState):
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = state

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> HubServer:
        threading.Thread(target=self.serve_forever, name="hub-server", daemon=True).start()
        return self
