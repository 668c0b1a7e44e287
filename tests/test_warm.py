"""The warm start of flow runs (flows/cli/warm.py): a real flow run on the real test API, its process
forked from the warm one, its exit status, cancellation and death passed through the launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli.warm import SOCKET_ENV
from tests.conftest import child_env
from tests.helpers import alive

FLOW = """
import os, sys, time
from pathlib import Path
from prefect import flow, get_run_logger
from prefect.events import emit_event

@flow
def probe(out: str, sleep: float = 0.0, fail: bool = False) -> None:
    get_run_logger().warning("probe under way")
    emit_event("probe.done", resource={"prefect.resource.id": f"probe.{os.getpid()}"})
    Path(out).write_text(f"{os.getpid()} {os.getppid()} {os.environ.get('PROBE_TAG', '')} {os.getcwd()}")
    time.sleep(sleep)
    if fail:
        raise RuntimeError("asked to fail")
"""


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A warm process on a socket, and the flow file its runs load."""
    root = tmp_path_factory.mktemp("warm")
    (root / "probe_flow.py").write_text(FLOW)
    socket_path = str(root / "engine.sock")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli.warm", "serve", socket_path], env=child_env())
    deadline = time.monotonic() + 120
    while not os.path.exists(socket_path):
        assert proc.poll() is None and time.monotonic() < deadline, "the warm process did not start"
        time.sleep(0.2)
    yield root, socket_path, proc.pid
    proc.kill()
    proc.wait()


def launch(prefect_api, root: Path, socket_path: str | None, tmp_path: Path, **parameters):
    """A flow run of ``probe`` created on the API and started as a worker starts it: the launcher."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="probe")
    def probe(out: str, sleep: float = 0.0, fail: bool = False) -> None: ...

    out = tmp_path / "probe.txt"
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(probe, parameters={"out": str(out), **parameters})
    env = child_env(
        PREFECT__FLOW_RUN_ID=str(run.id),
        PREFECT__FLOW_ENTRYPOINT=f"{root / 'probe_flow.py'}:probe",
        PREFECT_API_URL=prefect_api,
        PROBE_TAG="the-runs-own",
    )
    env.pop(SOCKET_ENV, None)
    if socket_path:
        env[SOCKET_ENV] = socket_path
    command = [sys.executable, "-m", "flows.cli.warm"]
    return run.id, out, subprocess.Popen(command, env=env, cwd=tmp_path, stderr=subprocess.PIPE)


def state(run_id) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state.type.value


def until(what, check, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_a_flow_run_is_forked_from_the_warm_process_with_its_own_environment(prefect_api, warm, tmp_path):
    root, socket_path, warm_pid = warm
    run_id, out, proc = launch(prefect_api, root, socket_path, tmp_path)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    pid, ppid, tag, cwd = out.read_text().split(" ", 3)
    assert int(ppid) == warm_pid and int(pid) != proc.pid  # forked from the warm process, not started
    assert (tag, cwd) == ("the-runs-own", str(tmp_path))  # the launcher's environment and folder
    assert state(run_id) == "COMPLETED"
    # what Prefect sends as a process exits (logs, events) is sent before the launcher ends
    assert "probe under way" in [log.message for log in logs(run_id)]
    assert f"probe.{pid}" in events(prefect_api, "probe.done")


def test_a_failed_flow_run_ends_its_launcher_as_it_ends_the_plain_engine(prefect_api, warm, tmp_path):
    root, socket_path, _ = warm
    codes = []
    for name, path in (("warm", socket_path), ("plain", None)):
        (tmp_path / name).mkdir()
        run_id, _, proc = launch(prefect_api, root, path, tmp_path / name, fail=True)
        codes.append(proc.wait(timeout=120))
        assert b"asked to fail" in proc.stderr.read()  # the run's output is the launcher's
        assert state(run_id) == "FAILED"
    assert codes[0] == codes[1]


def test_signals_to_the_launcher_reach_the_run_and_killing_it_kills_the_run(prefect_api, warm, tmp_path):
    root, socket_path, _ = warm
    (tmp_path / "first").mkdir()
    _, out, proc = launch(prefect_api, root, socket_path, tmp_path / "first", sleep=60)
    child = int(until("the run under way", lambda: out.exists() and out.read_text()).split()[0])
    proc.send_signal(signal.SIGTERM)  # as a worker cancels: the run's process gets the signal
    assert proc.wait(timeout=60) != 0
    until("the terminated run's process gone", lambda: not alive(child))

    _, out, proc = launch(prefect_api, root, socket_path, tmp_path, sleep=60)
    child = int(until("the run under way", lambda: out.exists() and out.read_text()).split()[0])
    proc.kill()  # the launcher killed outright: its run does not go on unseen
    proc.wait()
    until("the orphaned run's process gone", lambda: not alive(child), timeout=10)


@pytest.mark.parametrize("socket_kind", ["none", "hangs up"])
def test_without_a_warm_process_the_launcher_is_the_plain_engine(prefect_api, warm, tmp_path, socket_kind):
    import socket
    import threading

    root, _, _ = warm
    path = None
    if socket_kind == "hangs up":  # a warm process that cannot take the run: it closes the connection
        path = str(tmp_path / "refusing.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        threading.Thread(target=lambda: listener.accept()[0].close(), daemon=True).start()
    run_id, out, proc = launch(prefect_api, root, path, tmp_path)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    pid, _, tag, _ = out.read_text().split(" ", 3)
    assert int(pid) == proc.pid and tag == "the-runs-own"  # the launcher became the engine itself
    assert state(run_id) == "COMPLETED"


def logs(run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))


def events(api: str, name: str) -> list[str]:
    """The resource ids of the events called ``name`` the API holds."""
    import httpx

    body = {"filter": {"event": {"name": [name]}}, "limit": 50}
    for _ in range(50):  # the server persists events a moment after it receives them
        found = httpx.post(f"{api}/events/filter", json=body, timeout=30).json()["events"]
        if found:
            return [e["resource"]["prefect.resource.id"] for e in found]
        time.sleep(0.2)
    return []
