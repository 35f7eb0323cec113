"""Test helpers for Chroma server mode: a real `chroma run` subprocess, and a token-checking
reverse proxy in front of it.

Why a proxy for token auth: the Rust `chroma run` server of chromadb 1.x ignores the 0.x auth
settings (CHROMA_SERVER_AUTHN_PROVIDER / _CREDENTIALS; its frontend authenticator is a no-op,
chroma-core/chroma#3750, #4288), so a token is enforced by a proxy in front of it, which is
also how Chroma's docs deploy TLS and auth for 1.x. The proxy here checks the same header the
Python client sends (`Authorization: Bearer <token>`, or `X-Chroma-Token`).
"""

from __future__ import annotations

import http.client
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def chroma_binary() -> str | None:
    """The `chroma` CLI that ships with the chromadb package of this interpreter."""
    here = Path(sys.executable).parent / "chroma"
    if here.exists():
        return str(here)
    return shutil.which("chroma")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ChromaServer:
    """`chroma run --path <path> --host 127.0.0.1 --port <free port>`, stopped by its PID."""

    def __init__(self, path: str | os.PathLike, binary: str) -> None:
        self.path = Path(path)
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.path.parent / (self.path.name + ".log")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0, *, same_port: bool = False) -> "ChromaServer":
        """`same_port`: restart on the port it had (clients keep their replica_dir by it)."""
        last = ""
        for _ in range(3):  # a free port can be taken between probe and bind: retry
            if not (same_port and self.port):
                self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [self.binary, "run", "--path", str(self.path), "--host", self.host,
                     "--port", str(self.port)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, "ANONYMIZED_TELEMETRY": "False"})
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self.heartbeat():
                    return self
                time.sleep(0.1)
            last = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"`chroma run` did not answer its heartbeat; log tail:\n{last}")

    def heartbeat(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/api/v2/heartbeat", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


class TokenAuthProxy:
    """A reverse proxy that forwards to `upstream` only requests carrying `token`.

    Anything else gets 401 with a plain-text body, as nginx or Caddy would answer. It serves
    on 127.0.0.1 in a daemon thread of the test process; `seen_headers` and `refused` record what it saw.
    """

    def __init__(self, upstream_host: str, upstream_port: int, token: str) -> None:
        self.token = token
        self.seen_headers: list[dict[str, str]] = []
        self.refused = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _forward(self) -> None:
                headers = {k: v for k, v in self.headers.items()}
                proxy.seen_headers.append(headers)
                sent = headers.get("Authorization", "")
                ok = sent == f"Bearer {proxy.token}" or \
                    headers.get("X-Chroma-Token") == proxy.token
                length = int(headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if not ok:
                    proxy.refused += 1
                    msg = b"401 Unauthorized"
                    self.send_response(401)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(upstream_host, upstream_port, timeout=60)
                try:
                    fwd = {k: v for k, v in headers.items()
                           if k.lower() not in ("host", "authorization", "x-chroma-token",
                                                "connection")}
                    conn.request(self.command, self.path, body=body, headers=fwd)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection",
                                             "content-length"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = "127.0.0.1"
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "TokenAuthProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
