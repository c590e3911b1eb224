"""Child processes for the demo: started in their own process groups, stopped
as groups, so a Celery worker's pool and its embedded beat go with it and
nothing is left running after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import requests


def _die_with_parent() -> None:
    # Linux only: if the demo itself is killed with SIGKILL, the kernel sends the
    # child SIGTERM instead of leaving it orphaned. Elsewhere this is a no-op.
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


class Child:
    """One started command, its log file, and its process group."""

    def __init__(
        self, name: str, argv: Sequence[str], *, log_path: Path, cwd: Path, env: dict[str, str]
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = log_path.open("wb")  # one run per log
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            list(argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> int | None:
        return self.process.poll()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the child, then SIGKILL to whatever is left of its group.

        Only the leader gets SIGTERM: a Celery worker then shuts its pool and
        beat down in order, which it cannot do if they are signalled too.
        """
        pgid = self.process.pid  # start_new_session: the child leads its own group
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(pgid, signal.SIGKILL)
                self.process.wait(5)
        # Grandchildren (pool workers, embedded beat) that outlived their parent.
        _signal_group(pgid, signal.SIGKILL)
        self._log.close()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_until(ready: Callable[[], bool], *, child: Child, timeout: float) -> bool:
    """Poll ``ready`` until it is true, the child exits, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.exited() is not None:
            return False
        try:
            if ready():
                return True
        except (OSError, requests.RequestException):
            pass
        time.sleep(0.25)
    return False


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        return requests.get(url, timeout=2).status_code < 500

    return check


def log_contains(child: Child, text: str) -> Callable[[], bool]:
    def check() -> bool:
        return text in child.log_path.read_text(encoding="utf-8", errors="replace")

    return check
