"""A stand-in Kubernetes API server (no cluster on this machine), driven through the real ``kubernetes``
client (``.api``, ``.api_client``).

ray.io/v1 rayjobs: POST stores the job (409 AlreadyExists when the name is taken) and calls ``on_create``;
GET by name returns it with ``status_of(name)``. Subclasses decide the statuses.

Server-side apply of any namespaced custom object (the InferenceServices promotion applies): PATCH
``/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}`` with ``application/apply-patch+yaml`` and a
``fieldManager`` creates or replaces ``objects[(plural, ns, name)]`` and records the request in
``applies``; other patch types get 415, a missing field manager 422, as from a real API server.
``refuse_apply = (code, message)`` answers the next applies with that error (an admission webhook,
RBAC) and stores nothing. GET of such an object returns it.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

from kubernetes import client


class FakeKubeAPI:
    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.created: list[dict] = []
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.applies: list[dict] = []  # {"path", "content_type", "query", "body"} per apply request
        self.refuse_apply: tuple[int, str] | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # /apis/ray.io/v1/namespaces/{ns}/rayjobs
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name = body["metadata"]["name"]
                if name in fake.jobs:
                    return self._send(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"})
                fake.created.append(body)
                fake.jobs[name] = body
                fake.on_create(body)
                self._send(201, body)

            def do_PATCH(self):  # /apis/{group}/{version}/namespaces/{ns}/{plural}/{name}
                path, _, query = self.path.partition("?")
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, obj = fake.apply(path, self.headers["Content-Type"], parse_qs(query), body)
                self._send(code, obj)

            def do_GET(self):  # /apis/ray.io/v1/namespaces/{ns}/rayjobs/{name}
                key = _object_key(self.path.split("?")[0])
                if key in fake.objects:
                    return self._send(200, fake.objects[key])
                name = self.path.split("?")[0].strip("/").split("/")[-1]
                if name not in fake.jobs:
                    return self._send(404, {"kind": "Status", "code": 404})
                self._send(200, {**fake.jobs[name], "status": fake.status_of(name)})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        conf = client.Configuration(host=f"http://127.0.0.1:{self.server.server_port}")
        self.api_client = client.ApiClient(conf)
        self.api = client.CustomObjectsApi(self.api_client)

    def apply(self, path: str, content_type: str, query: dict, body: dict) -> tuple[int, dict]:
        """Server-side apply, as far as promotion relies on it: whole-object create-or-replace by one manager."""
        if content_type != "application/apply-patch+yaml":
            return 415, _status(415, "UnsupportedMediaType", f"this fake only applies, got {content_type}")
        if not query.get("fieldManager"):
            return 422, _status(422, "Invalid", "fieldManager is required for apply patch")
        if self.refuse_apply:
            code, message = self.refuse_apply
            return code, _status(code, "Forbidden" if code == 403 else "Invalid", message)
        self.applies.append({"path": path, "content_type": content_type, "query": query, "body": body})
        key = _object_key(path)
        generation = self.objects.get(key, {}).get("metadata", {}).get("generation", 0) + 1
        stored = {**body, "metadata": {**body["metadata"], "generation": generation}}
        self.objects[key] = stored
        return 200, stored

    def stored(self, plural: str, namespace: str, name: str) -> dict | None:
        return self.objects.get((plural, namespace, name))

    def on_create(self, body: dict) -> None:
        """Called once per created job (before the POST answers)."""

    def status_of(self, name: str) -> dict:
        return self.jobs[name].get("status", {})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _object_key(path: str) -> tuple[str, str, str] | None:
    """(plural, namespace, name) of /apis/{group}/{version}/namespaces/{ns}/{plural}/{name}."""
    parts = path.strip("/").split("/")
    if len(parts) == 7 and parts[0] == "apis" and parts[3] == "namespaces":
        return parts[5], parts[4], parts[6]
    return None


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}  # fmt: skip
