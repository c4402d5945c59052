"""A throwaway PostgreSQL server for tests: initdb + pg_ctl on loopback, in a temp folder.

    postgres_or_skip()                        # skips (with the apt line) when the binaries are absent
    with throwaway_postgres() as pg:          # a module-scoped fixture in the test files wraps this
        dsn = pg.create_database("lake")      # 'dbname=lake host=127.0.0.1 port=... user=postgres'

The server listens on 127.0.0.1 at a free port with a unix-socket folder of its own (never the
system's /var/run/postgresql), trusts loopback connections (no password), runs as the `postgres`
user when the test runs as root (initdb refuses root), and is stopped and removed on exit, also when
the test fails. Needs Debian's `postgresql` package (its binaries sit in
/usr/lib/postgresql/<version>/bin, off PATH); without them `postgres_or_skip()` skips with a message.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PG_APT_HINT = "install PostgreSQL's server binaries: apt-get install -y postgresql"


def pg_bin_dir() -> Path | None:
    """The newest PostgreSQL server bin folder (initdb, pg_ctl), or None when not installed."""
    env = os.environ.get("LALP_PG_BIN")
    candidates = [env] if env else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: _version_key(p), reverse=True)
    for on_path in (shutil.which("initdb"),):
        if on_path:
            candidates.append(str(Path(on_path).parent))
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


def _version_key(path: str) -> tuple:
    try:
        return tuple(int(x) for x in Path(path).parent.name.split("."))
    except ValueError:
        return (0,)


def postgres_or_skip() -> Path:
    import pytest

    b = pg_bin_dir()
    if b is None:
        pytest.skip(f"PostgreSQL server binaries (initdb, pg_ctl) not found; {PG_APT_HINT}")
    return b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    bin_dir: Path
    root: Path
    port: int
    host: str = "127.0.0.1"
    user: str = "postgres"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq key=value DSN (what DuckLake's `ducklake:postgres:` and psycopg2 take)."""
        return f"dbname={dbname} host={self.host} port={self.port} user={self.user}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        out = subprocess.run(
            [str(self.bin_dir / "psql") if (self.bin_dir / "psql").exists() else "psql",
             "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", self.host, "-p", str(self.port),
             "-U", self.user, "-d", dbname, "-c", sql],
            capture_output=True, text=True, timeout=60,
        )
        if out.returncode:
            raise RuntimeError(f"psql failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def create_database(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


def _as_postgres(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a server command as the `postgres` user when we are root (initdb refuses root)."""
    line = " ".join(shlex.quote(c) for c in cmd)
    if os.geteuid() == 0:
        full = ["su", "postgres", "-s", "/bin/sh", "-c", line]
    else:
        full = ["/bin/sh", "-c", line]
    return subprocess.run(full, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def throwaway_postgres(bin_dir: Path | None = None) -> Iterator[PgServer]:
    bin_dir = bin_dir or pg_bin_dir()
    if bin_dir is None:
        raise RuntimeError(f"PostgreSQL server binaries not found; {PG_APT_HINT}")
    root = Path(tempfile.mkdtemp(prefix="lalp-pg-"))
    if os.geteuid() == 0:  # the postgres user owns the cluster folder
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    os.chmod(root, 0o755)  # the test process (root) reads logs; postgres writes
    srv = PgServer(bin_dir=bin_dir, root=root, port=free_port())
    started = False
    try:
        r = _as_postgres([str(bin_dir / "initdb"), "-D", str(srv.data_dir), "-U", "postgres",
                          "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"])
        if r.returncode:
            raise RuntimeError(f"initdb failed: {r.stdout}\n{r.stderr}")
        _as_postgres(["mkdir", "-p", str(srv.socket_dir)])
        for attempt in range(3):
            # loopback only, our own socket folder, enough connections for several writer processes
            opts = (f"-c listen_addresses=127.0.0.1 -c port={srv.port} -c unix_socket_directories={srv.socket_dir} "
                    f"-c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            r = _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(srv.data_dir), "-l", str(root / "server.log"),
                              "-o", opts, "-w", "-t", "60", "start"])
            if r.returncode == 0:
                started = True
                break
            log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
            if "could not bind" in log or "already in use" in log:  # lost the port race: pick another
                srv.port = free_port()
                continue
            raise RuntimeError(f"pg_ctl start failed: {r.stdout}\n{r.stderr}\n{log[-2000:]}")
        if not started:
            raise RuntimeError(f"pg_ctl start failed 3 times: {r.stderr}")
        _wait_ready(srv)
        yield srv
    finally:
        if started:
            _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(srv.data_dir), "-m", "immediate", "-w", "stop"], timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(srv: PgServer, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((srv.host, srv.port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
