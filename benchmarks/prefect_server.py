"""A real ``prefect server start`` for a benchmark (and the tests' server stack): its own home, a free
loopback port, answering before the clock starts; on SQLite, or on a throwaway PostgreSQL cluster
(``postgres``: initdb in a temporary folder, as the ``postgres`` user when run as root)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def program(name: str) -> str:
    """A command of the environment running this benchmark (``.venv/bin/prefect``, ``.venv/bin/brats``),
    so that ``.venv/bin/python benchmarks/...`` needs no activated environment."""
    return str(Path(sys.executable).parent / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program (Debian keeps them in /usr/lib/postgresql/<major>/bin), or None."""
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


class Postgres:
    """A throwaway PostgreSQL cluster on a free loopback port, trust authentication, no fsync: for
    tests and benchmarks only. ``url`` is what ``PREFECT_API_DATABASE_CONNECTION_URL`` takes."""

    def __init__(self, log=subprocess.DEVNULL, timeout: float = 60):
        if postgres_bin("initdb") is None:
            raise FileNotFoundError("initdb: no PostgreSQL server here (Debian: apt-get install postgresql)")
        self.base = Path(tempfile.mkdtemp(prefix="brats-pg-"))
        root = os.geteuid() == 0  # the server refuses to run as root: run it as the postgres user
        self.as_user = ["runuser", "-u", "postgres", "--"] if root else []
        if root:
            shutil.chown(self.base, "postgres", "postgres")
        data, self.port = self.base / "data", free_port()
        init = [postgres_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "prefect", "-E", "UTF8", "--no-sync"]
        subprocess.run(self.as_user + init, check=True, stdout=log, stderr=log)
        server = [postgres_bin("postgres"), "-D", str(data), "-p", str(self.port), "-h", "127.0.0.1"]
        server += ["-k", str(self.base), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "max_connections=200"]
        self.process = subprocess.Popen(self.as_user + server, stdout=log, stderr=log, start_new_session=True)
        ready = [postgres_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "prefect", "-q"]
        deadline = time.monotonic() + timeout
        while subprocess.run(ready).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"PostgreSQL did not start on port {self.port}")
            time.sleep(0.2)
        create = [postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "prefect", "prefect"]
        subprocess.run(create, check=True, stdout=log, stderr=log)
        self.url = f"postgresql+asyncpg://prefect@127.0.0.1:{self.port}/prefect"

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then the folder goes."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


def prefect_server(
    home: Path, log=subprocess.DEVNULL, timeout: float = 120, port: int | None = None, database: str | None = None
) -> tuple[subprocess.Popen, str]:
    """(the server process, its API URL); stop it with ``terminate()``. ``port``: that one (a restart
    of a server on its own home), else a free one. ``database``: a SQLAlchemy URL (``Postgres.url``);
    default the home's SQLite."""
    port = port or free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if database:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database
    env.pop("PREFECT_API_URL", None)
    args = [program("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(args, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit(f"prefect server start did not answer within {timeout:.0f} s")


def stop(*processes: subprocess.Popen | None, timeout: float = 20) -> None:
    """Ask each process still running to stop (SIGTERM), in order; kill what has not after ``timeout``."""
    for p in processes:
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
