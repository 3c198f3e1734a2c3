"""A small Hub-compatible HTTP server for tests (stdlib only): the endpoints huggingface_hub's client uses to create
a repo, commit files and download them again. Repositories live in memory; every commit snapshots all files."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

USER = "test-user"


class HubState:
    def __init__(self):
        self.repos: dict[str, list[tuple[str, dict[str, bytes]]]] = {}  # repo -> [(commit sha, files)]
        self.lock = threading.Lock()

    def files(self, repo: str) -> tuple[str, dict[str, bytes]]:
        return self.repos[repo][-1]

    def commit(self, repo: str, changes: dict[str, bytes | None]) -> str:
        with self.lock:
            _, files = self.files(repo)
            files = {**files}
            for path, content in changes.items():
                if content is None:
                    files.pop(path, None)
                else:
                    files[path] = content
            sha = hashlib.sha1(f"{repo}{len(self.repos[repo])}".encode() + repr(sorted(files)).encode()).hexdigest()
            self.repos[repo].append((sha, files))
            return sha


class Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # -- helpers -----------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload, status: int = 200, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _not_found(self, message="Repository not found"):
        self._json({"error": message}, 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": message})

    def _repo(self, name: str) -> str | None:
        return name if name in self.state.repos else None

    # -- routes ------------------------------------------------------------------------------------------------

    def do_POST(self):
        path = unquote(urlparse(self.path).path)
        body = self._body()
        if path == "/api/repos/create":
            data = json.loads(body or b"{}")
            repo = f"{data.get('organization') or USER}/{data['name']}" if "/" not in data["name"] else data["name"]
            if repo not in self.state.repos:
                self.state.repos[repo] = [("0" * 40, {})]
            return self._json({"url": f"http://{self.headers['Host']}/{repo}", "name": repo, "id": repo})
        if path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/(.+?)/preupload/([^/]+)", path)
        if match and self._repo(match[1]):
            files = json.loads(body)["files"]
            return self._json(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        match = re.fullmatch(r"/api/models/(.+?)/commit/([^/]+)", path)
        if match and self._repo(match[1]):
            changes: dict[str, bytes | None] = {}
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    changes[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    changes[item["value"]["path"]] = None
            sha = self.state.commit(match[1], changes)
            return self._json(
                {
                    "commitUrl": f"http://{self.headers['Host']}/{match[1]}/commit/{sha}",
                    "commitOid": sha,
                    "success": True,
                }
            )
        match = re.fullmatch(r"/api/models/(.+?)/paths-info/([^/]+)", path)
        if match and self._repo(match[1]):
            sha, files = self.state.files(match[1])
            wanted = json.loads(body or b"{}").get("paths", [])
            return self._json([self._entry(p, files[p]) for p in wanted if p in files])
        return self._not_found(f"no route for POST {path}")

    def _entry(self, path: str, content: bytes) -> dict:
        return {"type": "file", "path": path, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = unquote(urlparse(self.path).path)
        if path == "/api/whoami-v2":
            return self._json({"type": "user", "name": USER, "auth": {"accessToken": {"role": "write"}}, "orgs": []})
        match = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
        if match and self._repo(match[1]):
            sha, files = self.state.files(match[1])
            return self._json(
                {
                    "id": match[1],
                    "modelId": match[1],
                    "sha": sha,
                    "private": False,
                    "siblings": [{"rfilename": name, "size": len(content)} for name, content in files.items()],
                    "tags": [],
                }
            )
        match = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(?:/(.*))?", path)
        if match and self._repo(match[1]):
            _, files = self.state.files(match[1])
            prefix = match[3] or ""
            return self._json([self._entry(p, c) for p, c in files.items() if p.startswith(prefix)])
        match = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        if match and self._repo(match[1]):
            sha, files = self.state.files(match[1])
            if match[3] not in files:
                return self._json({"error": "Entry not found"}, 404, {"X-Error-Code": "EntryNotFound"})
            content = files[match[3]]
            etag = f'"{hashlib.sha1(content).hexdigest()}"'
            return self._send(
                200, content, {"X-Repo-Commit": sha, "ETag": etag}, content_type="application/octet-stream"
            )
        return self._not_found(f"no route for GET {path}")


def serve(port: int) -> tuple[ThreadingHTTPServer, HubState]:
    """Start the server on 127.0.0.1:`port` in a daemon thread; returns (server, state)."""
    state = HubState()
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state
