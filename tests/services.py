"""Throwaway Redis and PostgreSQL servers for a test run (standard library only).

``python -m tests.services run -- python -m pytest`` starts what it can, runs the
command once on SQLite and, when a PostgreSQL cluster could be started, once more
on PostgreSQL (only the tests that use the database, without the ``browser`` ones:
the rest cannot differ between databases), then stops everything, also on
Ctrl-C. With ``CI=true`` a missing ``redis-server`` or PostgreSQL binary is an
error; locally it is a notice and the tests that need the service skip.

The conftest uses :func:`start_redis` and :meth:`RedisServer.attach` so tests can
stop and restart the broker on the same port.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

#: Set by ``run`` so the test process can take over the Redis it started.
REDIS_DIR_ENV = "DJANGO_SATORI_TEST_REDIS_DIR"
DATABASE_URL_ENV = "DJANGO_SATORI_TEST_DATABASE_URL"


class ServiceUnavailable(RuntimeError):
    """A service cannot be started here (binary missing, wrong user, ...)."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def free_port() -> int:
    """A loopback port that was free a moment ago (the server binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise ServiceUnavailable(f"timed out after {timeout:.0f}s waiting for {what}")


@functools.cache
def _setpriv_pdeathsig() -> bool:
    setpriv = shutil.which("setpriv")
    if not setpriv or not sys.platform.startswith("linux"):
        return False
    proc = subprocess.run([setpriv, "--help"], capture_output=True, text=True, check=False)
    return "--pdeathsig" in proc.stdout


def dies_with_parent(argv: Sequence[str], signame: str = "TERM", **setpriv: str) -> list[str]:
    """``argv`` prefixed so that it gets SIG``signame`` when its parent dies.

    A test run that is killed (timeout, SIGKILL) cannot clean up; without this its
    servers and workers would outlive it. ``setpriv`` options (``reuid=...``) may
    be added; on systems without ``setpriv --pdeathsig`` argv runs as it is.
    """
    options = [
        f"--{key.replace('_', '-')}" + (f"={value}" if value else "")
        for key, value in setpriv.items()
    ]
    if _setpriv_pdeathsig():
        return ["setpriv", *options, f"--pdeathsig={signame}", "--", *argv]
    if options:
        raise ServiceUnavailable("setpriv with --pdeathsig (util-linux >= 2.33) is required")
    return list(argv)


# --------------------------------------------------------------------------- Redis


def find_redis_server() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    """A ``redis-server`` on a fixed loopback port, in its own temporary directory.

    Whichever process calls :meth:`stop` or :meth:`start` (the ``run`` wrapper, or
    a test that takes the broker down) needs only the directory: the port and
    binary are in ``server.json``, the pid in ``redis.pid``. The server dies with
    the process that last started it.
    """

    def __init__(self, binary: str, port: int, workdir: Path, *, owned: bool = True) -> None:
        self.binary = binary
        self.port = port
        self.workdir = workdir
        # Only the creator removes the directory; an attached handle leaves it.
        self.owned = owned
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.workdir / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self.workdir / "redis.log"

    @classmethod
    def create(cls, binary: str | None = None, port: int | None = None) -> RedisServer:
        binary = binary or find_redis_server()
        if not binary:
            raise ServiceUnavailable(
                "redis-server not found on PATH (Debian: apt-get install redis-server)"
            )
        workdir = Path(tempfile.mkdtemp(prefix="django-satori-redis-"))
        server = cls(binary, port or free_port(), workdir)
        (workdir / "server.json").write_text(json.dumps({"binary": binary, "port": server.port}))
        return server

    @classmethod
    def attach(cls, workdir: str | Path) -> RedisServer:
        """A handle on a server another process created (see ``REDIS_DIR_ENV``)."""
        workdir = Path(workdir)
        info = json.loads((workdir / "server.json").read_text())
        return cls(info["binary"], int(info["port"]), workdir, owned=False)

    def _config(self) -> str:
        # Nothing is ever written to disk: a restart really starts empty, like a
        # broker that lost its queues.
        return "\n".join(
            [
                "bind 127.0.0.1",
                f"port {self.port}",
                f"dir {self.workdir}",
                "save ''",
                "appendonly no",
                "daemonize no",
                f"pidfile {self.pidfile}",
                f"logfile {self.logfile}",
                "",
            ]
        )

    def command(self, *parts: str, timeout: float = 2.0) -> bytes:
        """Send one inline command and return the first reply line (no client library)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(" ".join(parts).encode() + b"\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.strip()

    def ping(self) -> bool:
        try:
            return self.command("PING", timeout=0.5) == b"+PONG"
        except OSError:
            return False

    def _reap(self) -> None:
        # Another handle may have stopped the server we started: collect the zombie.
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    def is_running(self) -> bool:
        self._reap()
        return self.ping()

    def flushall(self) -> None:
        self.command("FLUSHALL")

    def start(self, timeout: float = 10.0) -> None:
        self._reap()
        if self.ping():
            return
        if port_open(self.port):
            raise ServiceUnavailable(
                f"port {self.port} is taken by something that is not our Redis"
            )
        conf = self.workdir / "redis.conf"
        conf.write_text(self._config())
        self._proc = subprocess.Popen(
            dies_with_parent([self.binary, str(conf)]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C is for the test run, not the broker
        )
        proc = self._proc

        def up() -> bool:
            if proc.poll() is not None:
                raise ServiceUnavailable(f"redis-server exited\n{self._log_tail()}")
            return self.ping()

        try:
            _wait_for(up, timeout, f"redis-server on port {self.port}")
        except ServiceUnavailable as exc:
            proc.kill()
            proc.wait()
            raise ServiceUnavailable(f"{exc}\n{self._log_tail()}") from None

    def stop(self, *, hard: bool = False, timeout: float = 10.0) -> None:
        """Stop the server; ``hard`` sends SIGKILL, as when a broker host dies."""
        pid = self._pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL if hard else signal.SIGTERM)
        try:
            _wait_for(lambda: not port_open(self.port), timeout, "redis-server to stop")
        except ServiceUnavailable:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_for(lambda: not port_open(self.port), 5.0, "redis-server to die")
        if self._proc is not None and self._proc.pid == pid:
            self._proc.wait()  # reap it
            self._proc = None
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()

    def _pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no redis log)"

    def cleanup(self) -> None:
        """Stop and, if this handle created the server, remove its directory."""
        self.stop()
        if self.owned:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} dir={self.workdir}>"


def start_redis(binary: str | None = None, port: int | None = None) -> RedisServer:
    """Start a throwaway Redis on a free loopback port; call ``cleanup()`` when done."""
    server = RedisServer.create(binary, port)
    try:
        server.start()
    except BaseException:
        shutil.rmtree(server.workdir, ignore_errors=True)
        raise
    return server


# ---------------------------------------------------------------------- PostgreSQL


def find_postgres_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``: PATH first, then Debian's layout."""
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).resolve().parent / "postgres").exists():
        return Path(initdb).resolve().parent
    # Debian keeps the server binaries off PATH; prefer the newest major version.
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    for candidate in candidates:
        path = Path(candidate)
        if (path / "initdb").exists() and (path / "postgres").exists():
            return path
    return None


class PostgresServer:
    """A throwaway PostgreSQL cluster: trust auth, loopback only, data in a temp dir."""

    def __init__(self, bindir: Path, port: int, workdir: Path, dbname: str) -> None:
        self.bindir = bindir
        self.port = port
        self.workdir = workdir
        self.dbname = dbname
        self.user = "postgres"
        # setpriv options that run PostgreSQL's binaries as the postgres user.
        self._as_user: dict[str, str] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def logfile(self) -> Path:
        return self.workdir / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgres://{self.user}@127.0.0.1:{self.port}/{self.dbname}"

    def _run(self, argv: Sequence[str], what: str) -> None:
        proc = subprocess.run(
            dies_with_parent(argv, **self._as_user),
            capture_output=True,
            text=True,
            check=False,
            cwd=self.workdir,  # the postgres user may not be able to read our cwd
            start_new_session=True,  # keep Ctrl-C for the test run, not the server
        )
        if proc.returncode != 0:
            raise ServiceUnavailable(
                f"{what} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
                f"{self._log_tail()}"
            )

    def _drop_privileges(self) -> None:
        # PostgreSQL refuses to run as root: run its binaries as the postgres user.
        if os.geteuid() != 0:
            return
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            raise ServiceUnavailable(
                "running as root and there is no 'postgres' user to run PostgreSQL as"
            ) from None
        os.chown(self.workdir, account.pw_uid, account.pw_gid)
        # setpriv rather than runuser: it execs, so the server is our child and
        # keeps the parent-death signal across the change of user.
        self._as_user = {
            "reuid": str(account.pw_uid),
            "regid": str(account.pw_gid),
            "init_groups": "",
        }

    def start(self) -> None:
        self.workdir.chmod(0o700)
        self._drop_privileges()
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D", str(self.datadir),
                "-U", self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            "initdb",
        )  # fmt: skip
        # The postmaster runs as our child (not through pg_ctl) so that it dies
        # with us. Durability is worthless for a throwaway cluster; speed is not.
        argv = [
            str(self.bindir / "postgres"),
            "-D", str(self.datadir),
            "-p", str(self.port),
            "-k", str(self.workdir),
            "-c", "listen_addresses=127.0.0.1",
            "-F",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
        ]  # fmt: skip
        with self.logfile.open("ab") as log:
            self._proc = subprocess.Popen(
                dies_with_parent(argv, **self._as_user),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self._proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise ServiceUnavailable(f"postgres exited:\n{self._log_tail()}")
            check = [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
            return subprocess.run(check, check=False).returncode == 0

        _wait_for(ready, 60, f"PostgreSQL on port {self.port}")
        self._run(
            [
                str(self.bindir / "createdb"),
                "-h", "127.0.0.1",
                "-p", str(self.port),
                "-U", self.user,
                self.dbname,
            ],
            "createdb",
        )  # fmt: skip

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no postgres log)"

    def stop(self, timeout: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        # Immediate shutdown: the data is thrown away, so there is nothing to flush.
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<PostgresServer {self.url} dir={self.workdir}>"


def start_postgres(dbname: str = "django_satori", bindir: Path | None = None) -> PostgresServer:
    """Start a throwaway PostgreSQL cluster with database ``dbname``; ``cleanup()`` it."""
    bindir = bindir or find_postgres_bindir()
    if bindir is None:
        raise ServiceUnavailable(
            "PostgreSQL server binaries (initdb, postgres) not found on PATH or in "
            "/usr/lib/postgresql/*/bin (Debian: apt-get install postgresql)"
        )
    workdir = Path(tempfile.mkdtemp(prefix="django-satori-pg-"))
    server = PostgresServer(bindir, free_port(), workdir, dbname)
    try:
        server.start()
    except BaseException:
        server.cleanup()
        raise
    return server


# ---------------------------------------------------------------------------- run


def _say(message: str) -> None:
    print(f"[tests.services] {message}", file=sys.stderr, flush=True)


def _run_pass(name: str, argv: Sequence[str], env: dict[str, str]) -> int:
    _say(f"{name} pass: {' '.join(argv)}")
    proc = subprocess.Popen(argv, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # After a Ctrl-C the child got the same SIGINT; after a SIGTERM to us it got
        # nothing yet. Either way give it time to tear down its own workers.
        for signum, grace in ((None, 1.0), (signal.SIGINT, 30.0), (signal.SIGKILL, None)):
            if signum is not None:
                proc.send_signal(signum)
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        raise


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _started(
    start: Callable[[], RedisServer | PostgresServer], label: str, required: bool
) -> Iterator[RedisServer | PostgresServer | None]:
    """Start a service, or explain why not; always clean it up afterwards."""
    try:
        server = start()
    except ServiceUnavailable as exc:
        if required:
            raise SystemExit(
                f"[tests.services] ERROR: {label} is required (CI=true): {exc}"
            ) from None
        _say(f"NOTICE: no {label}; the tests that need it will skip. ({exc})")
        yield None
        return
    _say(f"started {label}: {server!r}")
    try:
        yield server
    finally:
        server.cleanup()


def run(
    argv: Sequence[str],
    *,
    postgres: bool,
    postgres_args: Sequence[str],
    junit_dir: Path | None = None,
) -> int:
    """Run ``argv`` on SQLite, then on PostgreSQL; return 0 only if every pass passed.

    With ``junit_dir``, each pass also gets ``--junitxml=<dir>/junit-<pass>.xml``.
    """

    def report(name: str) -> list[str]:
        if junit_dir is None:
            return []
        junit_dir.mkdir(parents=True, exist_ok=True)
        return [f"--junitxml={junit_dir / f'junit-{name.lower()}.xml'}"]

    required = in_ci()
    base_env = {k: v for k, v in os.environ.items() if k not in {DATABASE_URL_ENV, REDIS_DIR_ENV}}
    results: list[tuple[str, int]] = []
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(_started(start_redis, "Redis", required))
        pg = (
            stack.enter_context(_started(start_postgres, "PostgreSQL", required))
            if postgres
            else None
        )
        if isinstance(redis, RedisServer):
            base_env["REDIS_URL"] = base_env["CELERY_BROKER_URL"] = redis.url
            base_env[REDIS_DIR_ENV] = str(redis.workdir)
        results.append(("SQLite", _run_pass("SQLite", [*argv, *report("SQLite")], base_env)))
        if isinstance(pg, PostgresServer):
            if isinstance(redis, RedisServer):
                redis.start()  # a test may have left it stopped
                redis.flushall()  # nothing queued by the first pass may leak into this one
            env = {**base_env, DATABASE_URL_ENV: pg.url}
            pg_argv = [*argv, *postgres_args, *report("PostgreSQL")]
            results.append(("PostgreSQL", _run_pass("PostgreSQL", pg_argv, env)))
    _say("summary:")
    for name, code in results:
        _say(f"  {name + ' pass':<16} {'passed' if code == 0 else f'FAILED (exit {code})'}")
    if postgres and len(results) < 2:
        _say(f"  {'PostgreSQL pass':<16} not run (no server could be started)")
    return 0 if all(code == 0 for _, code in results) else 1


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.services", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    run_parser = sub.add_parser("run", help="run a command (pytest) with throwaway services")
    run_parser.add_argument("--no-postgres", action="store_true", help="SQLite pass only")
    run_parser.add_argument(
        "--postgres-args",
        default="-m 'database and not browser'",
        help="extra arguments for the PostgreSQL pass (shell-quoted; default: %(default)s)",
    )
    run_parser.add_argument(
        "--junit-dir", type=Path, help="give each pytest pass --junitxml=DIR/junit-<pass>.xml"
    )
    run_parser.add_argument("command", nargs=argparse.REMAINDER, help="-- command ...")
    options = parser.parse_args(args)
    command = list(options.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("run needs a command after --")
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return run(
            command,
            postgres=not options.no_postgres,
            postgres_args=shlex.split(options.postgres_args),
            junit_dir=options.junit_dir,
        )
    except KeyboardInterrupt:
        _say("interrupted; services stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
