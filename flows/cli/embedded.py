"""One Prefect API for every process of a run, started as early as possible.

With no ``PREFECT_API_URL`` configured, a run needs a temporary API. Prefect would start one inside
the process that runs a flow, and Dask worker processes would each start their own, so their task
runs would not show up beside the flow run. ``prefect_api()`` starts one temporary API, up front,
and exports its address so the workers the flow spawns report to it too. With a configured server
it does nothing.

The temporary API is Prefect's own (``uvicorn --factory prefect.server.api.server:create_app``,
loopback only, UI off: what ``prefect.server.api.server.SubprocessASGIServer`` runs), but launched
here without importing the server in this process: that import alone costs seconds, and the server
process imports it again anyway. Unlike Prefect's, it registers no block types (none is used here).
``EphemeralAPI.start()`` returns at once, so the ``brats`` command starts it first and imports the
flow and parses its options while the API comes up.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOST = "127.0.0.1"  # never reachable from another machine


class EphemeralAPI:
    """A temporary Prefect API in a child process, on a free loopback port."""

    def __init__(self, process: subprocess.Popen, port: int):
        self.process, self.port = process, port
        self.api_url = f"http://{HOST}:{port}/api"

    @staticmethod
    def command(port: int) -> list[str]:
        prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(prefect_dir.parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            HOST,
            "--port",
            str(port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]

    @classmethod
    def start(cls) -> EphemeralAPI:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            # No block types registered: no run of this project uses blocks, and registering them imports every
            # installed Prefect collection (prefect_dask, hence distributed) into the server first: 0.4 s of start-up.
            "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
            "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",  # the memo would load those collections anyway
        }
        env.pop("PREFECT_API_URL", None)
        server = cls(subprocess.Popen(cls.command(port), env=env), port)
        atexit.register(server.stop)
        return server

    def wait(self, timeout: float | None = None) -> str:
        """Block until the API answers its health check; its URL."""
        timeout = timeout or float(os.environ.get("BRATS_API_STARTUP_TIMEOUT", 180))  # slow on a busy laptop
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the temporary Prefect API exited with code {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.api_url
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the temporary Prefect API did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def prefect_api(server: EphemeralAPI | None = None) -> Iterator[str]:
    """The configured API, or ``server`` (already started), or a temporary API started now."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if server is None and (url := PREFECT_API_URL.value()):
        yield url
        return
    server = server or EphemeralAPI.start()
    try:
        # Done while the API starts: Prefect's lazy import for the first flow run's parameters (0.3 s), and
        # torch, which every flow here but an ingest with nothing to normalize needs (1-2 s).
        import fastapi.encoders  # noqa: F401
        import torch  # noqa: F401

        url = server.wait()
        os.environ["PREFECT_API_URL"] = url  # for the worker processes the flow starts
        # Heartbeats let a server mark a crashed run; this API goes when the process goes, so nothing
        # reads them, and Prefect joins its heartbeat thread (which sleeps in 1 s steps) after each flow run.
        with temporary_settings({PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield url
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for worker in (APILogWorker, EventsWorker):  # the run's last logs and events reach the API before it goes
            worker.drain_all(timeout=10)
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
