"""Real servers for tests: find (or install) redis-server and PostgreSQL, run them on loopback.

The pytest fixtures in `tests/conftest.py` are thin wrappers around what is here; keeping the
process handling in plain functions and classes makes it readable and usable outside pytest.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pytest_postgresql.janitor import DatabaseJanitor

LOOPBACK = "127.0.0.1"
DEBIAN_PACKAGES = ("redis-server", "postgresql")
POSTGRES_LIBDIR = Path("/usr/lib/postgresql")  # Debian: one bin/ per installed major version
POSTGRES_TOOLS = ("pg_ctl", "initdb", "postgres")
# initdb and pg_ctl refuse to run as root; when we are root the cluster belongs to this user.
POSTGRES_OS_USER = "postgres"
FALLBACK_OS_USER = "switchboard-tests"
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


class MissingServerError(RuntimeError):
    """A server binary is missing and we may not install it."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


# --- finding and installing the binaries ------------------------------------------------------


def find_redis_server() -> Path | None:
    found = shutil.which("redis-server")
    return Path(found) if found else None


def find_postgres_bindir() -> Path | None:
    """The directory holding pg_ctl, initdb and postgres: from PATH, else Debian's newest."""
    candidates: list[Path] = []
    if pg_ctl := shutil.which("pg_ctl"):
        # /usr/local/bin/pg_ctl may be a symlink; its siblings live next to the real file.
        candidates.append(Path(pg_ctl).resolve().parent)
    versioned = [d for d in POSTGRES_LIBDIR.glob("*/bin") if d.parent.name.isdigit()]
    candidates += sorted(versioned, key=lambda d: int(d.parent.name), reverse=True)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in POSTGRES_TOOLS):
            return bindir
    return None


@dataclass(frozen=True, slots=True)
class ServerBinaries:
    redis_server: Path
    postgres_bindir: Path


def ensure_server_binaries(log: Callable[[str], None]) -> ServerBinaries:
    """Find redis-server and PostgreSQL; install the missing Debian packages when we are root."""
    redis_server, postgres_bindir = find_redis_server(), find_postgres_bindir()
    missing = [
        package
        for package, found in zip(DEBIAN_PACKAGES, (redis_server, postgres_bindir), strict=True)
        if found is None
    ]
    if missing:
        install_debian_packages(missing, log)
        redis_server, postgres_bindir = find_redis_server(), find_postgres_bindir()
        if redis_server is None or postgres_bindir is None:
            raise MissingServerError(f"installed {', '.join(missing)} but still cannot find them")
        log(f"installed {', '.join(missing)}: {redis_server}, {postgres_bindir}")
    assert redis_server is not None and postgres_bindir is not None
    return ServerBinaries(redis_server=redis_server, postgres_bindir=postgres_bindir)


def install_debian_packages(packages: list[str], log: Callable[[str], None]) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise MissingServerError(
            f"the tests need real servers; missing: {', '.join(packages)}. Install them "
            f"(Debian/Ubuntu: `sudo apt-get install {' '.join(DEBIAN_PACKAGES)}`), or run the "
            "tests as root on Debian/Ubuntu to have them installed automatically."
        )
    log(f"installing {', '.join(packages)} with apt-get (missing on this machine)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = {"check": True, "env": env, "stdin": subprocess.DEVNULL}
    with system_services_not_started():
        subprocess.run(["apt-get", "update"], **apt)
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", *packages],
            **apt,
        )


@contextmanager
def system_services_not_started() -> Iterator[None]:
    """Keep apt from starting system redis/PostgreSQL daemons: we only want the binaries.

    Debian's documented switch is a policy-rc.d answering 101 ("action forbidden"); an existing
    one (Docker images ship it) is left alone.
    """
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\n# written by switchboard tests/servers.py\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


# --- PostgreSQL ---------------------------------------------------------------------------------


def _unprivileged_account() -> pwd.struct_passwd:
    """The account that owns the cluster when we run as root (Debian's `postgres` if present)."""
    for name in (POSTGRES_OS_USER, FALLBACK_OS_USER):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", FALLBACK_OS_USER],
        check=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return pwd.getpwnam(FALLBACK_OS_USER)


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with trust auth, started with pg_ctl.

    Durability is switched off (fsync, synchronous_commit, full_page_writes): the data dies with
    the test run, and CREATE DATABASE per test stays cheap. The attributes match what
    pytest-postgresql's `postgresql_noproc(depends_on=...)` reads from its base fixture.
    """

    host = LOOPBACK
    user = "postgres"  # database superuser created by initdb
    password: str | None = None
    options = ""
    maintenance_dbname = "postgres"
    template_dbname = "template1"

    def __init__(self, bindir: Path, port: int | None = None) -> None:
        self.bindir = bindir
        self.port = port or free_port()
        self.workdir: Path | None = None
        # As root we drop to an unprivileged account; otherwise we run as ourselves.
        self._account = _unprivileged_account() if os.geteuid() == 0 else None

    @property
    def datadir(self) -> Path:
        assert self.workdir is not None, "server not started"
        return self.workdir / "data"

    @property
    def logfile(self) -> Path:
        assert self.workdir is not None, "server not started"
        return self.workdir / "postgresql.log"

    def start(self) -> PostgresServer:
        # As root, TMPDIR may be a directory the account cannot enter; /tmp always lets it in.
        parent = "/tmp" if self._account is not None else None
        self.workdir = Path(tempfile.mkdtemp(prefix="switchboard-pg-", dir=parent))
        if self._account is not None:
            os.chown(self.workdir, self._account.pw_uid, self._account.pw_gid)
        try:
            self._run(
                "initdb", "--pgdata", str(self.datadir), "--username", self.user,
                "--auth", "trust", "--encoding", "UTF8", "--no-locale", "--no-sync",
            )  # fmt: skip
            server_options = [
                "-c", f"listen_addresses={self.host}", "-p", str(self.port),
                "-c", "unix_socket_directories=",  # TCP only: no socket path length limits
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            ]  # fmt: skip
            self._run(
                "pg_ctl", "start", "--wait", "--timeout", "60", "--pgdata", str(self.datadir),
                "--log", str(self.logfile), "--options", shlex.join(server_options),
            )  # fmt: skip
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are cut) and delete its files."""
        if self.workdir is None:
            return
        try:
            if (self.datadir / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "--wait", "--pgdata", str(self.datadir), "-m", "fast")
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, tool: str, *args: str) -> None:
        account = self._account
        result = subprocess.run(
            [str(self.bindir / tool), *args],
            cwd=self.workdir,  # the account may not be allowed into our working directory
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-4000:] if self.logfile.exists() else ""
            raise RuntimeError(
                f"{tool} {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}{log}"
            )


class PostgresEndpoint(Protocol):
    """Connection details, as held by PostgresServer and pytest-postgresql's executors."""

    host: str
    port: int
    user: str
    password: str | None
    maintenance_dbname: str

    @property
    def template_dbname(self) -> str: ...


@contextmanager
def fresh_postgres_database(server: PostgresEndpoint) -> Iterator[str]:
    """Create an empty database cloned from the server's template; drop it on exit.

    Yields a SQLAlchemy URL, `postgresql+asyncpg://user@host:port/dbname`. The drop first cuts
    any session still connected, so a test that leaks a connection cannot block it.
    """
    dbname = f"test_{uuid.uuid4().hex[:16]}"
    with DatabaseJanitor(
        user=server.user,
        host=server.host,
        port=server.port,
        dbname=dbname,
        template_dbname=server.template_dbname,
        maintenance_dbname=server.maintenance_dbname,
        password=server.password,
    ):
        yield f"postgresql+asyncpg://{server.user}@{server.host}:{server.port}/{dbname}"
