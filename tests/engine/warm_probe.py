"""What a process started as `python -m tests.engine.warm_probe ARGS` finds itself to be:
printed as JSON for tests/engine/test_warm_start.py, which compares a warm start (a
fork of the warm interpreter) with a real one."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import sys
import threading


def _umask() -> str:
    with open("/proc/self/status") as status:
        return next(line.split()[1] for line in status if line.startswith("Umask:"))


def _describe() -> dict[str, object]:
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    return {
        "argv": sys.argv[1:],
        "argv0": os.path.basename(sys.argv[0]),
        "cwd": os.getcwd(),
        "path0": sys.path[0],
        "env": dict(os.environ),
        "stdin": sys.stdin.read(),
        "fds": fds[:3],  # 0-2; one more is listdir's own
        "more_fds": len(fds) - 4,
        "signals": {name: repr(signal.getsignal(getattr(signal, name)))
                    for name in ("SIGINT", "SIGTERM", "SIGCHLD", "SIGPIPE", "SIGHUP")},
        "threads": threading.active_count(),
        "limits": [resource.getrlimit(getattr(resource, name))
                   for name in ("RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_AS")],
        "umask": _umask(),
        "random": random.random(),
        "encoding": [sys.stdout.encoding, sys.getfilesystemencoding(), sys.flags.utf8_mode],
        "main": __name__,
    }


if __name__ == "__main__":
    if sys.argv[1:] == ["hang"]:
        threading.Event().wait()
    print(json.dumps(_describe()))
    print("to stderr\r\nsecond line", file=sys.stderr)
    sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
