"""A real ``prefect server start`` for a benchmark: its own home, a free loopback port, answering
before the clock starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def program(name: str) -> str:
    """A command of the environment running this benchmark (``.venv/bin/prefect``, ``.venv/bin/brats``),
    so that ``.venv/bin/python benchmarks/...`` needs no activated environment."""
    return str(Path(sys.executable).parent / name)


def prefect_server(
    home: Path, log=subprocess.DEVNULL, timeout: float = 120, port: int | None = None
) -> tuple[subprocess.Popen, str]:
    """(the server process, its API URL); stop it with ``terminate()``. ``port``: that one (a restart
    of a server on its own home), else a free one."""
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
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
