"""A stand-in Kubernetes API server for ray.io/v1 rayjobs (no cluster on this machine), driven
through the real ``kubernetes`` client (``.api``).

POST stores the job (409 AlreadyExists when the name is taken) and calls ``on_create``;
GET by name returns it with ``status_of(name)``. Subclasses decide the statuses.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kubernetes import client


class FakeKubeAPI:
    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.created: list[dict] = []
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

            def do_GET(self):  # /apis/ray.io/v1/namespaces/{ns}/rayjobs/{name}
                name = self.path.split("?")[0].strip("/").split("/")[-1]
                if name not in fake.jobs:
                    return self._send(404, {"kind": "Status", "code": 404})
                self._send(200, {**fake.jobs[name], "status": fake.status_of(name)})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        conf = client.Configuration(host=f"http://127.0.0.1:{self.server.server_port}")
        self.api = client.CustomObjectsApi(client.ApiClient(conf))

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
