"""``brats worker``: a Prefect process worker that stops the way an operator expects.

    brats worker --pool cpu [--name cpu-1] [--limit N] [--healthcheck]

It is Prefect's own ``ProcessWorker`` (what ``prefect worker start --pool cpu --type process``
runs), changed in how it stops:

* the first SIGTERM or Ctrl-C: it takes no new flow run, lets the runs it started finish (their
  processes write their output through it, so it stays until they end), then leaves;
* a second one: it hands its runs back (each is cancelled, which stops its process, and scheduled
  again, for the next worker of the pool: a training resumes from its last checkpoint) and leaves.

The worker runs in a process of its own session, below this one: Ctrl-C in a terminal reaches the
whole foreground process group, and would otherwise kill the flow runs' processes with it; here it
reaches this process only, which passes it on to the worker as SIGTERM. Should this process be
killed outright, the worker hands its runs back and leaves as on a second signal.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

from flows.cli.warm import SOCKET_ENV

DRAIN_GRACE_S = 5.0  # a run submitted by the last poll before the signal may take this long to start
POLL_S = 2.0  # Prefect's default is 10 s: a run triggered by a new scan would wait 5 s on average for it


def work(
    pool: str,
    name: str | None = None,
    limit: int | None = None,
    healthcheck: bool = False,
    poll: float | None = None,
    warm: bool = True,
) -> int:
    """A process worker of the pool that finishes its runs when asked to stop (once) or hands them back (twice).

    Args:
        pool: the work pool to take flow runs from (a process pool: cpu)
        name: the worker's name (default: Prefect's)
        limit: at most this many flow runs at once
        healthcheck: serve Prefect's worker health check (http://localhost:8080/health)
        poll: seconds between the worker's queries for flow runs to start (default:
            PREFECT_WORKER_QUERY_SECONDS where set, else 2)
        warm: start flow runs by forking a process that has Prefect and torch imported
            (flows/cli/warm.py: ~3 s sooner each); --no-warm: a new Python process each, as Prefect does
    """
    flags = (str(limit or 0), str(int(healthcheck)), str(int(warm)))
    command = [sys.executable, "-m", "flows.cli.worker", pool, name or "", *flags]
    worker = subprocess.Popen(command, start_new_session=True, env=worker_env(os.environ, poll))

    def forward(signum, frame) -> None:
        worker.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    return worker.wait()


def worker_env(env, poll: float | None) -> dict[str, str]:
    """The worker process's environment: ``poll`` as Prefect's query interval, else the one set, else ``POLL_S``."""
    seconds = poll if poll is not None else env.get("PREFECT_WORKER_QUERY_SECONDS", POLL_S)
    return {**env, "PREFECT_WORKER_QUERY_SECONDS": str(seconds)}


async def serve(pool: str, name: str | None, limit: int | None, healthcheck: bool, warm: bool) -> None:
    import anyio
    from prefect.workers.process import ProcessWorker

    worker = ProcessWorker(work_pool_name=pool, name=name, limit=limit)
    engine = start_warm_engine() if warm else None
    active: set = set()  # the flow runs this worker started and that have not ended
    draining = anyio.Event()
    poll, run = worker.get_and_submit_flow_runs, worker.run

    async def get_and_submit_flow_runs():
        return [] if draining.is_set() else await poll()

    async def counted(*args, **kwargs):
        flow_run = kwargs.get("flow_run") or args[0]
        configuration = kwargs.get("configuration") or args[1]
        if engine and not configuration._command_configured:  # a command the deployment set is kept
            configuration.command = f"{sys.executable} -m flows.cli.warm"
            configuration._command_configured = True
        active.add(flow_run.id)
        try:
            return await run(*args, **kwargs)
        finally:
            active.discard(flow_run.id)

    worker.get_and_submit_flow_runs, worker.run = get_and_submit_flow_runs, counted
    try:
        await run_until_stopped(worker, healthcheck, draining, active)
    finally:
        if engine:
            engine.kill()
            shutil.rmtree(os.path.dirname(os.environ[SOCKET_ENV]), ignore_errors=True)


def start_warm_engine() -> subprocess.Popen:
    """``flows.cli.warm``'s warm process, on a socket of this worker's that its flow runs inherit."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="brats-warm-"), "engine.sock")
    os.environ[SOCKET_ENV] = path  # the flow runs' environment is this process's, over the job's own
    return subprocess.Popen([sys.executable, "-m", "flows.cli.warm", "serve", path])


async def run_until_stopped(worker, healthcheck: bool, draining, active: set) -> None:
    """The worker until a signal stops it: the first drains it, the second hands its runs back."""
    import anyio

    async with anyio.create_task_group() as group:
        group.start_soon(lambda: worker.start(with_healthcheck=healthcheck))
        group.start_soon(orphaned, os.getppid())
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                if draining.is_set():
                    print(f"worker {worker.name}: handing {len(active)} flow run(s) back to the pool", flush=True)
                    try:
                        await hand_back(sorted(active))
                    except Exception as e:  # the API gone: the runs stay as they are (a crash resumes them)
                        print(f"worker {worker.name}: could not hand the runs back: {e}", flush=True)
                    group.cancel_scope.cancel()
                    return
                draining.set()
                print(
                    f"worker {worker.name}: stopping; no new flow run taken, {len(active)} running to finish "
                    "(signal again to hand them back to the pool)",
                    flush=True,
                )
                group.start_soon(leave_when_idle, active, group.cancel_scope)


async def orphaned(parent: int) -> None:
    """A second signal to this process once ``brats worker`` above it is gone (killed outright)."""
    import anyio

    while os.getppid() == parent:
        await anyio.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
    await anyio.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


async def leave_when_idle(active: set, scope) -> None:
    """Cancel ``scope`` (the worker) once no run of it has been active for ``DRAIN_GRACE_S``."""
    import anyio

    idle_since = anyio.current_time()
    while anyio.current_time() - idle_since < DRAIN_GRACE_S:
        await anyio.sleep(0.5)
        if active:
            idle_since = anyio.current_time()
    scope.cancel()


async def hand_back(flow_run_ids: list) -> None:
    """Cancel each run (its worker stops its process) and, once it is, schedule it again for the pool."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling, Scheduled

    async with get_client() as client:
        for flow_run_id in flow_run_ids:
            await client.set_flow_run_state(flow_run_id, Cancelling(message="its worker was stopped"), force=True)
        with anyio.move_on_after(60):
            for flow_run_id in flow_run_ids:
                while not (await client.read_flow_run(flow_run_id)).state.is_final():
                    await anyio.sleep(0.5)
        for flow_run_id in flow_run_ids:
            await client.set_flow_run_state(
                flow_run_id, Scheduled(message="handed back by its stopped worker"), force=True
            )


if __name__ == "__main__":
    import anyio

    pool, name, limit, healthcheck, warm = sys.argv[1:6]
    anyio.run(serve, pool, name or None, int(limit) or None, healthcheck == "1", warm == "1")
