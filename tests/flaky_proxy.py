"""An HTTP proxy in front of a real server that fails chosen requests: what a flaky ingress does.

Rules match a request by method and a path regex and act on the first ``times`` matches (``every=k``: on every
k-th match instead, from the first):
``"refuse"`` answers 503 without forwarding; ``"lose"`` forwards it (the server acts) and answers 503 anyway,
as when a response is lost on the way back. Everything else is forwarded as is.
"""

from __future__ import annotations

import http.client
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Rule:
    method: str
    path: re.Pattern
    times: int
    action: str  # "refuse" | "lose"
    every: int = 0
    hits: int = 0
    seen: int = 0


class FlakyProxy:
    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.host, self.port = target.hostname, target.port
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str, int]] = []  # (method, path, status returned)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(self, method: str, path: str, times: int = 1, action: str = "refuse", every: int = 0) -> Rule:
        rule = Rule(method.upper(), re.compile(path), times, action, every)
        with self._lock:
            self.rules.append(rule)
        return rule

    def failed(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, status in self.log if status == 503]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _action(self, method: str, path: str) -> str | None:
        with self._lock:
            for rule in self.rules:
                if rule.method not in (method, "*") or not rule.path.search(path):
                    continue
                rule.seen += 1
                due = (rule.seen - 1) % rule.every == 0 if rule.every else rule.hits < rule.times
                if due:
                    rule.hits += 1
                    return rule.action
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                action = proxy._action(self.command, self.path)
                if action == "refuse":
                    return self._answer(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE"}', {})
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if action == "lose":
                    return self._answer(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE"}', {})
                skip = ("transfer-encoding", "connection", "content-length")
                self._answer(resp.status, data, {k: v for k, v in resp.getheaders() if k.lower() not in skip})

            def _answer(self, status: int, data: bytes, headers: dict) -> None:
                proxy.log.append((self.command, self.path, status))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        return Handler
