"""`python -m reactor ARGS` without paying for its imports each time.

Most of a short `reactor` command's CPU is its imports (psycopg, trio, pydantic,
structlog: ~1 s on the 2-core CI machine), and the suite runs about a hundred such
commands. Each test process keeps one warm interpreter that has imported
`reactor.cli` once; a command is a fork of it that becomes what
`subprocess.run([sys.executable, "-m", "reactor", *args], env=env, cwd=cwd)` would
have started: the same arguments, exactly the given environment, that working
directory, stdin empty, stdout and stderr captured, its own exit status.

What a fork cannot reproduce falls back to a real `exec`: an environment that
Python reads at start-up (PYTHON*, LANG, LC_*, TZ), or no warm interpreter
(REACTOR_TEST_COLD=1, or it failed to start). tests/engine/test_warm_start.py
compares a warm command with a cold one.

Process tree: the warm interpreter forks a monitor per command, which forks the
command and reports its pid and then its exit status over the command's own Unix
socket connection; commands run side by side. The warm interpreter ends when its
test process closes its stdin.

Run as a script: `python tests/warm_start.py SOCKET_PATH`.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import Any

COLD_VAR = "REACTOR_TEST_COLD"
# Read by the interpreter when it starts, before any of our code: a fork inherits the
# warm interpreter's reading of them instead.
START_UP_VARS = ("PYTHON", "LANG", "LC_", "TZ")
READY = b"ready\n"


def usable(env: Mapping[str, str]) -> bool:
    """Whether a command with this environment may be a fork of the warm interpreter."""
    if os.environ.get(COLD_VAR):
        return False
    return not any(key.startswith(START_UP_VARS) for key in env)


class WarmInterpreter:
    """The test process's side: starts the warm interpreter once, runs commands on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket_path = ""
        self._failed = False

    def _start(self) -> bool:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return True
            if self._failed:
                return False
            directory = tempfile.mkdtemp(prefix="reactor-warm-")
            self._socket_path = os.path.join(directory, "socket")
            proc = subprocess.Popen(
                [sys.executable, __file__, self._socket_path], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=directory,
                env={"PATH": os.environ.get("PATH", os.defpath)})
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            if not ready or proc.stdout.readline() != READY:
                proc.kill()
                proc.wait()
                self._failed = True  # the rest of this process runs commands cold
                return False
            self._proc = proc
            atexit.register(self._stop, proc, directory)
            return True

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes], directory: str) -> None:
        if proc.stdin is not None:
            proc.stdin.close()  # the warm interpreter ends on end of file
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(directory, ignore_errors=True)

    def run(self, args: Sequence[str], env: Mapping[str, str], cwd: str, timeout: float,
            module: str = "reactor") -> subprocess.CompletedProcess[str] | None:
        """`python -m MODULE ARGS`'s outcome, as `subprocess.run(..., capture_output=True,
        text=True)` gives it; None if the warm interpreter is not there (run it cold).

        Raises:
            subprocess.TimeoutExpired: the command ran longer than `timeout` (killed).
        """
        if not self._start():
            return None
        with tempfile.TemporaryDirectory(prefix="reactor-warm-out-") as out:
            stdout, stderr = os.path.join(out, "stdout"), os.path.join(out, "stderr")
            proc = self.start(args, env, cwd, stdout, stderr, module=module)
            if proc is None:
                return None
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                raise subprocess.TimeoutExpired(proc.args, timeout, _read(stdout),
                                                _read(stderr)) from None
            return subprocess.CompletedProcess(proc.args, code, _read(stdout), _read(stderr))

    def start(self, args: Sequence[str], env: Mapping[str, str], cwd: str, stdout: str,
              stderr: str, *, append: bool = False, module: str = "reactor",
              ) -> WarmProcess | None:
        """`subprocess.Popen([sys.executable, "-m", MODULE, *args], ...)` with stdout and
        stderr written to those paths (one file if the same path; appended to if
        `append`); None if the warm interpreter is not there (start it cold)."""
        if not self._start():
            return None
        request = {"module": module, "args": list(args), "env": dict(env),
                   "cwd": os.fspath(cwd), "stdout": stdout, "stderr": stderr,
                   "append": append}
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self._socket_path)
            conn.sendall(json.dumps(request).encode() + b"\n")
            started = _line(conn)
        except OSError:
            started = b""
        if not started:
            conn.close()
            return None  # the warm interpreter is gone, or could not fork
        return WarmProcess([sys.executable, "-m", module, *args], int(started), conn)


class WarmProcess:
    """A command forked from the warm interpreter, as much of `subprocess.Popen` as the
    tests use: `pid`, `returncode`, `poll`, `wait`, `send_signal`, `terminate`, `kill`.
    Its exit status comes over the socket from its monitor (its parent)."""

    def __init__(self, args: list[str], pid: int, conn: socket.socket) -> None:
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self._conn = conn

    def poll(self) -> int | None:
        if self.returncode is None:
            readable, _, _ = select.select([self._conn], [], [], 0)
            if readable:
                self._collect()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            readable, _, _ = select.select([self._conn], [], [], timeout)
            if not readable:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self._collect()
        assert self.returncode is not None
        return self.returncode

    def _collect(self) -> None:
        with self._conn:
            status = _line(self._conn)
        # No status: its monitor died (never seen); say so as a kill would.
        self.returncode = int(status) if status else -signal.SIGKILL

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _line(conn: socket.socket) -> bytes:
    """One line, read a byte at a time: a buffered read could take the exit status that
    follows the pid too, and then a select on the socket would wait for it forever."""
    line = b""
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            return b""
        line += byte
    return line


def _read(path: str) -> str:
    """What `text=True` would have given: UTF-8, universal newlines."""
    try:
        with open(path, encoding="utf-8", newline=None) as f:
            return f.read()
    except FileNotFoundError:
        return ""


WARM = WarmInterpreter()


# -- the warm interpreter ------------------------------------------------------------------

def serve(socket_path: str) -> dict[str, Any]:
    """Import once, then fork a monitor per connection. Returns only in a command's
    process, with its request."""
    # The imports each command would pay for: the CLI, and what `reactor run` loads.
    import reactor.cli
    import reactor.engine.runtime  # noqa: F401
    from reactor.clinic.app import QUEUES

    for queue in QUEUES:
        queue.processor_class  # noqa: B018  (imports its module)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    gc.freeze()  # the imported objects: not traversed (nor their pages copied) in forks
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the kernel
    sys.stdout.buffer.write(READY)
    sys.stdout.flush()
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1):
            os._exit(0)  # the test process is done
        if listener not in readable:
            continue
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            request = _monitor(conn)  # returns in the command's process only
            conn.close()
            return request
        conn.close()


def _monitor(conn: socket.socket) -> dict[str, Any]:
    """Fork the command; report its pid, then its exit status; end. Returns only in the
    command's process."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # so that waitpid sees the command
        with conn.makefile("rb") as lines:
            request: dict[str, Any] = json.loads(lines.readline())
        pid = os.fork()
    except BaseException:
        os._exit(1)  # the test process sees no pid and runs the command cold
    if pid == 0:
        return request
    try:
        conn.sendall(f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    finally:
        os._exit(0)


def become(request: dict[str, Any]) -> None:
    """Turn this fork into `python -m MODULE ARGS` in the request's directory and
    environment, then run it; the interpreter then ends as that command would."""
    os.chdir(request["cwd"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    mode = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if request["append"] else os.O_TRUNC)
    out = os.open(request["stdout"], mode, 0o600)
    os.dup2(out, 1)
    if request["stderr"] != request["stdout"]:
        os.close(out)
        out = os.open(request["stderr"], mode, 0o600)
    os.dup2(out, 2)
    os.close(out)
    coerced = os.environ.get("LC_CTYPE")  # what PEP 538 set at start-up, as it would
    os.environ.clear()
    os.environ.update(request["env"])
    if coerced and "LC_ALL" not in os.environ:
        os.environ.setdefault("LC_CTYPE", coerced)
    gc.unfreeze()
    sys.argv = ["-m", *request["args"]]
    sys.path[0] = os.getcwd()  # what `-m` puts first
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    become(serve(sys.argv[1]))
