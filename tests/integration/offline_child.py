"""The child process of test_no_network.py: index and search with every network attempt
from Python recorded and refused.

Usage: python offline_child.py BACKEND REPORT.json [WAIT_S]

The guard is installed before anything else is imported: socket connects and sends to
anything but a Unix socket or loopback, and name lookups of anything but localhost, are
recorded and fail with ENETUNREACH. Native code (onnxruntime's telemetry) calls libc
directly and is invisible here; the parent watches the system calls for that.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import sys
import tempfile
import time
import traceback

ATTEMPTS: list[dict] = []
_LOCAL_NAMES = {None, "", "localhost", "localhost.localdomain", "ip6-localhost"}


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path or abstract name
        return True
    host = address[0] if isinstance(address, tuple) and address else address
    if isinstance(host, bytes):
        host = host.decode()
    if host in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(call: str, target) -> None:
    ATTEMPTS.append({"call": call, "target": repr(target),
                     "stack": traceback.format_stack(limit=12)[:-2]})
    raise OSError(errno.ENETUNREACH, f"network attempt blocked by the test guard: {call} "
                  f"{target!r}")


def install_guard() -> None:
    cls = socket.socket
    originals = {name: getattr(cls, name) for name in ("connect", "connect_ex", "sendto")}

    def connect(self, address, _orig=originals["connect"]):
        if self.family != socket.AF_UNIX and not _is_local(address):
            _refuse("connect", address)
        return _orig(self, address)

    def connect_ex(self, address, _orig=originals["connect_ex"]):
        if self.family != socket.AF_UNIX and not _is_local(address):
            _refuse("connect_ex", address)
        return _orig(self, address)

    def sendto(self, data, *args, _orig=originals["sendto"]):
        address = args[-1]
        if self.family != socket.AF_UNIX and not _is_local(address):
            _refuse("sendto", address)
        return _orig(self, data, *args)

    cls.connect, cls.connect_ex, cls.sendto = connect, connect_ex, sendto
    getaddrinfo, create_connection = socket.getaddrinfo, socket.create_connection

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_local((host,)):
            _refuse("getaddrinfo", host)
        return getaddrinfo(host, *args, **kwargs)

    def guarded_create_connection(address, *args, **kwargs):
        if not _is_local(address):
            _refuse("create_connection", address)
        return create_connection(address, *args, **kwargs)

    socket.getaddrinfo = guarded_getaddrinfo
    socket.create_connection = guarded_create_connection
    gethostbyname = socket.gethostbyname

    def guarded_gethostbyname(host):
        if not _is_local((host,)):
            _refuse("gethostbyname", host)
        return gethostbyname(host)

    socket.gethostbyname = guarded_gethostbyname


def main() -> int:
    backend, report_path = sys.argv[1], sys.argv[2]
    wait_s = float(sys.argv[3]) if len(sys.argv) > 3 else 15.0
    install_guard()
    from retrievekit.pipeline import HybridRetriever
    from retrievekit.types import Document

    docs = [Document("Cats are small mammals that purr and hunt mice.", id="cats"),
            Document("Rust is a systems programming language with memory safety.", id="rust"),
            Document("Sourdough bread rises with a wild yeast starter.", id="bread")]
    error = None
    hits: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        try:
            with HybridRetriever({"store": {"path": d},
                                  "embedder": {"backend": backend}}) as r:
                r.add_documents(docs)
                hits = [h.id for h in r.search("which pets hunt mice", k=3)]
                engine = r.embedder.engine_for(1)
        except Exception as exc:  # reported to the parent, which fails with it
            error = f"{type(exc).__name__}: {exc}"
            engine = None
    onnx_loaded = "onnxruntime" in sys.modules
    if onnx_loaded:
        # onnxruntime's telemetry starts ~9 s after its first session (measured): stay
        # alive long enough for an attempt to show
        time.sleep(wait_s)
    with open(report_path, "w", encoding="utf-8") as fh:
        json.dump({"backend": backend, "engine": engine, "hits": hits, "error": error,
                   "onnxruntime_loaded": onnx_loaded, "attempts": ATTEMPTS}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
