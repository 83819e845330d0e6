"""Run model-written code against its tests, away from this process: pass@1 for code prompts.

lm-evaluation-harness's code metrics call `evaluate.load("code_eval")`, which downloads its metric from a
hub; this runner needs nothing but the interpreter.  Each program runs in a fresh `python -I` subprocess
in an empty temporary directory, with a wall-clock timeout, limits on address space, CPU time, file size
and open files (`resource.setrlimit`), an environment stripped to PATH, and no network: on Linux in a new
network namespace when `unshare --net` is permitted, and in any case with the socket module disabled before
the program starts.  That keeps honest mistakes (infinite loops, memory blow-ups, stray writes, network
calls) contained; it is not a jail for hostile code, so run untrusted evaluations in a container.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Runs before the program: no sockets (a second line of defence behind the network namespace).
_PRELUDE = """\
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the tidar_megatron sandbox")
_socket.socket = _no_network
_socket.create_connection = _no_network
_socket.getaddrinfo = _no_network
del _socket, _no_network
"""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str   # "passed", "failed", "timeout", or the last line of the error


def _limits(memory_mb: int, cpu_seconds: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        os.setsid()  # its own process group: a timeout kills whatever it started
    return apply


@functools.lru_cache(maxsize=1)
def _network_namespace_prefix() -> tuple[str, ...]:
    """`unshare --net` (and the user namespace it needs without root) when this machine allows it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "--net"), (unshare, "--user", "--map-root-user", "--net")):
        try:
            if subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ()


def run_tests(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Execute `program` (the completed code followed by its tests); passed when it exits with 0."""
    with tempfile.TemporaryDirectory(prefix="tidar-sandbox-") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w") as f:
            f.write(_PRELUDE + program)
        command = [*_network_namespace_prefix(), sys.executable, "-I", path]
        proc = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                                preexec_fn=_limits(memory_mb, int(timeout) + 1))
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(False, "timeout")
    if proc.returncode == 0:
        return Outcome(True, "passed")
    lines = (stderr or stdout).strip().splitlines()
    return Outcome(False, lines[-1] if lines else f"exit code {proc.returncode}")
