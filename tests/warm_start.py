"""`python -m reactor ARGS` without paying for its imports each time.

Most of a short `reactor` command's CPU is its imports (psycopg, trio, pydantic,
structlog: ~1 s on the 2-core CI machine), and the suite runs about a hundred such
commands. Each test process keeps one warm interpreter that has imported
`reactor.cli` (what `python -m reactor` imports first) once; a command is a fork of
it that becomes what `subprocess.run([sys.executable, "-m", "reactor", *args],
env=env, cwd=cwd)` would have started: the same arguments, exactly the given
environment, that working directory, the test process's open-files limit and umask,
stdin empty, stdout and stderr captured, its own exit status; random state and the
feed's ticket key of its own. What a fork cannot be runs as a real `exec`:
- an environment with anything but PATH, the app's settings and libpq's PG*
  variables (Python, the loader and libraries read others at start-up or import);
- a test process whose limits or umask differ from the warm interpreter's;
- a working directory that does not exist (Popen's error is raised in the test);
- REACTOR_TEST_COLD=1 (every command, e.g. to rule the warm start out), or no warm
  interpreter (it failed to start, or printed anything while importing).
The hash seed is the warm interpreter's in every fork. tests/engine/test_warm_start.py
compares a warm command with a cold one.

Process tree: the warm interpreter forks a monitor per command, which forks the
command and reports its pid and then its exit status over the command's own Unix
socket connection; commands run side by side. The warm interpreter ends when its
test process closes its stdin (or ends).

Run as a script: `python tests/warm_start.py SOCKET_PATH`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import os
import resource
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
READY = b"ready\n"
LIMITS = (resource.RLIMIT_NOFILE, resource.RLIMIT_NPROC, resource.RLIMIT_CORE,
          resource.RLIMIT_AS, resource.RLIMIT_DATA, resource.RLIMIT_STACK,
          resource.RLIMIT_FSIZE, resource.RLIMIT_CPU)


@functools.cache
def _forkable_env() -> frozenset[str]:
    """PATH, the settings the app reads when it runs, and libpq's variables."""
    from reactor.clinic.settings import Settings

    return frozenset({"PATH", *(f.alias for f in Settings.model_fields.values() if f.alias)})


def usable(env: Mapping[str, str]) -> bool:
    """Whether a command with this environment may be a fork of the warm interpreter."""
    if os.environ.get(COLD_VAR):
        return False
    allowed = _forkable_env()
    return all(key in allowed or key.startswith("PG") for key in env)


def _process_state() -> tuple[Any, ...]:
    """What a child inherits from the test process besides its environment."""
    with open("/proc/self/status") as status:
        umask = next(line.split()[1] for line in status if line.startswith("Umask:"))
    return (umask, *(resource.getrlimit(limit) for limit in LIMITS))


# What a child of this process inherited when the tests began: the warm interpreter is
# started only then, not in the middle of a test that lowered a limit.
_AT_IMPORT = _process_state()


class WarmInterpreter:
    """The test process's side: starts the warm interpreter once, runs commands on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket_path = ""
        self._state: tuple[Any, ...] = ()
        self._failed = False

    def _ready(self) -> bool:
        """True if a command may be forked now (the warm interpreter is up, started
        with what this process would hand a child now)."""
        with self._lock:
            state = _process_state()
            if self._proc is not None and self._proc.poll() is None:
                return state == self._state
            if self._failed or state != _AT_IMPORT:
                return False
            directory = tempfile.mkdtemp(prefix="reactor-warm-")
            self._socket_path = os.path.join(directory, "socket")
            said = os.path.join(directory, "stderr")
            with open(said, "wb") as stderr:
                proc = subprocess.Popen(
                    [sys.executable, __file__, self._socket_path], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=stderr, cwd=directory,
                    env={"PATH": os.environ.get("PATH", os.defpath)})
                assert proc.stdout is not None
                ready, _, _ = select.select([proc.stdout], [], [], 120)
                if not ready or proc.stdout.readline() != READY or os.path.getsize(said):
                    # Slow, broken, or it warned while importing (a cold command would
                    # print that on its own stderr): the rest of this process runs cold.
                    proc.kill()
                    proc.wait()
                    shutil.rmtree(directory, ignore_errors=True)
                    self._failed = True
                    return False
            self._proc, self._state = proc, state
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
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(directory, ignore_errors=True)

    def run(self, args: Sequence[str], env: Mapping[str, str], cwd: str, timeout: float,
            module: str = "reactor") -> subprocess.CompletedProcess[str] | None:
        """`python -m MODULE ARGS`'s outcome, as `subprocess.run(..., capture_output=True,
        text=True)` gives it; None if it cannot be a fork now (run it cold).

        Raises:
            subprocess.TimeoutExpired: the command ran longer than `timeout` (killed).
        """
        with tempfile.TemporaryDirectory(prefix="reactor-warm-out-") as out:
            stdout, stderr = os.path.join(out, "stdout"), os.path.join(out, "stderr")
            proc = self.start(args, env, cwd, stdout, stderr, module=module)
            if proc is None:
                return None
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                raise subprocess.TimeoutExpired(proc.args, timeout, _read(stdout),
                                                _read(stderr)) from None
            finally:
                proc.close()
            return subprocess.CompletedProcess(proc.args, code, _read(stdout), _read(stderr))

    def start(self, args: Sequence[str], env: Mapping[str, str], cwd: str, stdout: str,
              stderr: str, *, append: bool = False, module: str = "reactor",
              ) -> WarmProcess | None:
        """`subprocess.Popen([sys.executable, "-m", MODULE, *args], ...)` with stdout and
        stderr written to those paths (one file if the same path; appended to if
        `append`); None if it cannot be a fork now (start it cold)."""
        if not usable(env) or not os.path.isdir(cwd) or not self._ready():
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

    def close(self) -> None:
        """Stop listening for the exit status (the process is not touched)."""
        self._conn.close()

    def send_signal(self, sig: int) -> None:
        # Ended meanwhile (reaped by its monitor, its status not read yet): as Popen,
        # nothing to signal. The monitor reaps it only after it ended, and the pid is
        # not reused before then.
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
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
    import reactor.cli  # noqa: F401  (what `python -m reactor` imports first)

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
            shutil.rmtree(os.path.dirname(socket_path), ignore_errors=True)
            os._exit(0)  # the test process is done
        if listener not in readable:
            continue
        conn, _ = listener.accept()
        try:
            pid = os.fork()
        except OSError:
            pid = -1  # no pid is sent: the test process runs the command cold
        if pid == 0:
            listener.close()
            request = _monitor(conn)  # returns in the command's process only
            conn.close()
            return request
        conn.close()


def _monitor(conn: socket.socket) -> dict[str, Any]:
    """Fork the command; report its pid, then its exit status; end. Returns only in the
    command's process."""
    stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    inherited = {sig: signal.getsignal(sig) for sig in stopping}
    try:
        # A Ctrl-C or a `timeout` sent to the whole group is the command's to handle:
        # its monitor stays to report how it ended.
        for sig in stopping:
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # so that waitpid sees the command
        with conn.makefile("rb") as lines:
            request: dict[str, Any] = json.loads(lines.readline())
        pid = os.fork()
    except BaseException:
        os._exit(1)  # the test process sees no pid and runs the command cold
    if pid == 0:
        for sig, handler in inherited.items():  # as the warm interpreter started
            if handler is not None:
                signal.signal(sig, handler)
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
    os.chdir(request["cwd"])
    coerced = os.environ.get("LC_CTYPE")  # what PEP 538 set at start-up, as it would
    os.environ.clear()
    os.environ.update(request["env"])
    if coerced:
        os.environ.setdefault("LC_CTYPE", coerced)
    # trio draws its clock offset and scheduling shuffles from a generator seeded at
    # import: each process has its own (the random module reseeds itself on fork).
    trio_random = getattr(sys.modules.get("trio._core._run"), "_r", None)
    if trio_random is not None:
        trio_random.seed()
    gc.unfreeze()
    sys.argv = ["-m", *request["args"]]
    sys.path[0] = os.getcwd()  # what `-m` puts first
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    become(serve(sys.argv[1]))
