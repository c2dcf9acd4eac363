"""A private PostgreSQL server on 127.0.0.1 for the shared-study tests (and tools/bench_workers.py): Debian's
`postgresql` package (tools/install_services.sh installs it), a fresh cluster in a temporary folder, started
here and stopped on the way out. As root the server runs as the package's `postgres` user (PostgreSQL refuses
root)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from tests.loopback_sshd import free_port


def pg_bin() -> Path | None:
    """The folder of initdb/pg_ctl, or None when PostgreSQL's server is not installed."""
    for pattern in ("/usr/lib/postgresql/*/bin/initdb", "/usr/local/pgsql/bin/initdb"):
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@contextmanager
def loopback_postgres():
    """Yields a SQLAlchemy URL (postgresql+psycopg2://onnxconet@127.0.0.1:PORT/onnxconet, trust auth on loopback
    only) of a new server whose files live in a new temporary folder (one the server's user can reach: pytest's
    are private to root); stops it and removes the folder on the way out."""
    bindir = pg_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed: run tools/install_services.sh")
    folder = Path(tempfile.mkdtemp(prefix="onnxconet-pg-"))
    data = folder / "pgdata"
    data.mkdir()
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        os.chown(data, user.pw_uid, user.pw_gid)
    try:
        with _server(bindir, data) as url:
            yield url
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(_as_server_user(cmd), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{Path(cmd[0]).name} failed: {(done.stderr or done.stdout).strip()[-500:]}")


@contextmanager
def _server(bindir: Path, data: Path):
    run = _run
    run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "onnxconet", "-A", "trust", "-E", "UTF8", "--no-sync"]
    )
    port = free_port()
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off -c max_connections=50"
    run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w", "-t", "60", "-o", opts,
         "start"])  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            done = subprocess.run(
                [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "onnxconet", "onnxconet"],
                capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"createdb failed: {done.stderr.strip()[-300:]}")
            time.sleep(0.3)
        yield f"postgresql+psycopg2://onnxconet@127.0.0.1:{port}/onnxconet"
    finally:
        subprocess.run(
            _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
            capture_output=True,
        )
