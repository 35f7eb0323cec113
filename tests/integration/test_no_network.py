"""Indexing and searching with the bundled model makes no network attempt at all.

A child process (offline_child.py) makes an embedded store in a temporary directory, indexes
three documents and searches them, once per embedding backend. Three layers watch it:

- a Linux network namespace (`unshare -rn`, where unprivileged namespaces are allowed): only
  a loopback interface exists, so nothing can leave the machine whatever the child tries;
- a guard inside the child that records and refuses every socket connect/send and name
  lookup from Python that is not for a Unix socket or loopback;
- `strace -f` on connect/sendto/sendmsg/sendmmsg, which sees native code too (onnxruntime's
  telemetry resolves its host from C++). Inside the namespace such an attempt fails at once
  (ENETUNREACH) and silently, so the system call is the only evidence: any connect or send
  to a non-loopback INET address counts, a DNS query being one to port 53. Without strace
  this layer is skipped, with the reason.

onnxruntime starts its telemetry about 9 s after its first session (measured), so a child
that loaded onnxruntime waits 15 s before it exits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("offline_child.py")
SRC = Path(__file__).resolve().parents[2] / "src"
TRACED = "connect,sendto,sendmsg,sendmmsg"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")]


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _namespace() -> list[str]:
    return ["unshare", "-rn"] if shutil.which("unshare") and \
        _works(["unshare", "-rn", "true"]) else []


def _strace(ns: list[str]) -> list[str] | None:
    """The strace prefix that works here (inside the namespace when there is one)."""
    if not shutil.which("strace"):
        return None
    for extra in (["--seccomp-bpf"], []):  # seccomp-bpf: far less overhead, strace >= 5.3
        cmd = ["strace", "-f", "-qq", *extra, "-e", f"trace={TRACED}", "-o", os.devnull]
        if _works([*ns, *cmd, "true"]):
            return cmd[:-2]
    return None


_INET = re.compile(r"sa_family=AF_INET6?, sin6?_port=htons\((\d+)\), "
                   r"(?:sin_addr=inet_addr\(\"([^\"]+)\"\)|.*?inet_pton\(AF_INET6, \"([^\"]+)\")")


def native_attempts(trace: str) -> list[str]:
    """System-call lines that reach for a non-loopback INET address (the port shown)."""
    out = []
    for line in trace.splitlines():
        if not line.split(" ", 1)[-1].lstrip().startswith(tuple(TRACED.split(","))):
            continue
        for port, v4, v6 in _INET.findall(line):
            addr = v4 or v6
            if not (addr.startswith("127.") or addr in ("::1", "::ffff:127.0.0.1")):
                out.append(f"{'DNS ' if port == '53' else ''}to {addr}:{port}: {line[:160]}")
    return out


def test_native_attempts_parser():
    lines = ('12 connect(8, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr('
             '"10.255.255.53")}, 16) = -1 ENETUNREACH (Network is unreachable)\n'
             '12 connect(9, {sa_family=AF_INET, sin_port=htons(8000), sin_addr=inet_addr('
             '"127.0.0.1")}, 16) = 0\n'
             '12 connect(3, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1\n'
             '13 sendto(5, "x", 1, 0, {sa_family=AF_INET6, sin6_port=htons(443), '
             'sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "2001:db8::1", &sin6_addr), '
             'sin6_scope_id=0}, 28) = -1\n')
    found = native_attempts(lines)
    assert len(found) == 2
    assert found[0].startswith("DNS to 10.255.255.53:53")
    assert found[1].startswith("to 2001:db8::1:443")


_RUNS: dict[str, dict] = {}


def run_child(backend: str, tmp_path_factory) -> dict:
    if backend in _RUNS:
        return _RUNS[backend]
    work = tmp_path_factory.mktemp(f"offline-{backend}")
    report, trace = work / "report.json", work / "trace.txt"
    ns = _namespace()
    strace = _strace(ns)
    cmd = [*ns, *(strace + ["-o", str(trace)] if strace else []), sys.executable, str(CHILD),
           backend, str(report), "15"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH"))
                                         if p)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and report.exists(), done.stderr[-3000:]
    result = json.loads(report.read_text())
    result["namespace"] = bool(ns)
    result["native"] = native_attempts(trace.read_text()) if strace else None
    _RUNS[backend] = result
    return result


BACKENDS = [pytest.param("torch", id="torch"),
            pytest.param("auto", id="auto")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_and_search_make_no_attempt_from_python(backend, tmp_path_factory):
    result = run_child(backend, tmp_path_factory)
    assert result["error"] is None, result["error"]
    assert result["hits"][0] == "cats"
    assert result["attempts"] == [], "\n".join(
        f"{a['call']} {a['target']}\n" + "".join(a["stack"]) for a in result["attempts"])


# "auto" once made onnxruntime's native telemetry resolve its collector's host (DNS to
# port 53) ~9 s after the first session; onnx_backend now imports it with telemetry off
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_index_and_search_make_no_attempt_from_native_code(backend, tmp_path_factory):
    result = run_child(backend, tmp_path_factory)
    if result["native"] is None:
        pytest.skip("strace is missing or not permitted here (ptrace): native code's "
                    "network attempts (onnxruntime's telemetry) cannot be seen")
    assert result["error"] is None, result["error"]
    assert result["native"] == [], "\n".join(result["native"][:10])
