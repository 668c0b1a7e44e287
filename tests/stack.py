"""A real Prefect server for the tests, set up as the README's one-machine deploy path gives it:
``prefect server start`` on 127.0.0.1 (on a throwaway PostgreSQL cluster, as a team runs it and
deploy/docker-compose.yml sets it up; SQLite only where no PostgreSQL server is installed; its own
PREFECT_HOME, basic auth as in deploy/docker-compose.yml), deploy/bootstrap.sh (pools, the "gpu"
concurrency limit, every deployment of deploy/prefect.yaml), one process worker per pool; and a REST
client to look at it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.prefect_server import Postgres, postgres_bin
from tests.helpers import free_port, register_model, stop

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
AUTH = "brats:not-a-secret"  # the server's basic auth, as docker-compose sets it up


class Stack:
    """The running server, its workers, their logs, and a REST client."""

    def __init__(self, api: str, env: dict, data: Path, logs: Path):
        import httpx

        self.api, self.env, self.data, self.logs = api, env, data, logs
        user, password = AUTH.split(":")
        self.http = httpx.Client(base_url=api, timeout=30, auth=httpx.BasicAuth(user, password))

    def request(self, method: str, path: str, body: dict | None = None):
        """One REST call; a 503 (SQLite busy under load: "database is locked") is tried again."""
        for attempt in range(5):
            r = self.http.request(method, path, json=body)
            if r.status_code != 503 or attempt == 4:
                r.raise_for_status()
                return r.json()
            time.sleep(2)

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, body: dict):
        return self.request("POST", path, body)

    def deployment(self, name: str) -> dict:
        return self.get(f"/deployments/name/{name}")

    def run(self, deployment: str, params: dict) -> str:
        """A flow run of a deployment with these parameters (the server adds the deployment's others)."""
        return self.post(f"/deployments/{self.deployment(deployment)['id']}/create_flow_run", {"parameters": params})[
            "id"
        ]

    def runs_of(self, deployment: str) -> list[dict]:
        return self.post("/flow_runs/filter", {"deployments": {"id": {"any_": [self.deployment(deployment)["id"]]}}})

    def artifacts(self, flow_run_id: str) -> dict[str, dict]:
        return {
            a["key"]: a
            for a in self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
            if a["key"]
        }

    def wait(self, flow_run_id: str, timeout: float = 150) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.get(f"/flow_runs/{flow_run_id}")
            if run["state"]["type"] in TERMINAL:
                assert run["state"]["type"] == "COMPLETED", f"{run['name']}: {run['state']['message']}\n{self.tail()}"
                return run
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"flow run {run['name']} still {run['state']['name']} after {timeout}s\n{self.tail()}"
                )
            time.sleep(1)

    def until(self, what: str, check, timeout: float = 150):
        deadline = time.monotonic() + timeout
        while not (found := check()):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout}s\n{self.tail()}")
            time.sleep(1)
        return found

    def tail(self, n: int = 4000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in sorted(self.logs.glob("*.log")))


@contextmanager
def running_stack(base: Path, raw: Path) -> Iterator[Stack]:
    """Server + bootstrap.sh (pools, concurrency limit, deployments) + one process worker per pool."""
    home, data, logs = base / "prefect-home", base / "data", base / "logs"
    for d in (home, data / "raw", data / "inbox", logs):
        d.mkdir(parents=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BRATS_"))}
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": api,
            "PREFECT_UI_API_URL": api,  # a port other than 4200: the UI must be told where its API is
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_AUTH_STRING": AUTH,  # the server asks every client for it ...
            "PREFECT_API_AUTH_STRING": AUTH,  # ... and every client (CLI, workers, flow runs, brats) gives it
            "PREFECT_LOGGING_LEVEL": "INFO",
            "BRATS_REPO": str(ROOT),
            "BRATS_DATA": str(data),
            "BRATS_STORAGE": str(data),
            "BRATS_DASK_WORKERS": "1",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        }
    )
    pg = Postgres(open(logs / "postgres.log", "wb")) if postgres_bin("initdb") else None
    if pg is not None:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = pg.url
    shutil.copytree(raw, data / "raw", dirs_exist_ok=True)
    register_model(data / "models")
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str, program: str = "prefect") -> subprocess.Popen:
        out = open(logs / f"{name}.log", "wb")
        p = subprocess.Popen(
            [str(BIN / program), *args],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(p)
        return p

    stack = Stack(api, env, data, logs)
    try:
        server = start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        deadline = time.monotonic() + 120
        while True:
            try:
                if stack.http.get("/health").status_code == 200:
                    break
            except Exception:
                pass
            assert server.poll() is None and time.monotonic() < deadline, f"the server did not come up\n{stack.tail()}"
            time.sleep(0.5)
        # the workers start beside bootstrap.sh (a pool not made yet is made as a process pool)
        start("worker-cpu", "worker", "--pool", "cpu", "--name", "cpu-1", program="brats")
        start("worker-gpu", "worker", "--pool", "gpu", "--name", "gpu-1", program="brats")
        boot = subprocess.run(
            [str(ROOT / "deploy" / "bootstrap.sh")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        (logs / "bootstrap.log").write_text(boot.stdout + boot.stderr)
        assert boot.returncode == 0, stack.tail()
        yield stack
    finally:
        stop(procs[1:])  # the workers first, while their server still answers
        stop(procs[:1])
        if pg is not None:
            pg.stop()
