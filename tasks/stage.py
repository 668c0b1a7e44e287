"""What every task of the pipeline shares: how it retries, and how a flow gathers a mapped stage.

* ``stage_task``: Prefect's ``@task`` with the project's preset: two retries on a transient error
  (``OSError``: a flaky disk, bucket or network), none on invalid input or config, no result
  caching (arrays travel by path, and a rerun must redo the work it is asked to).
* ``gather``: wait for a mapped stage's futures as they finish, advancing its progress, and sort
  them into result rows and failures (each with the item it was for), so one bad case never
  stops the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.futures import as_completed


def is_transient(task, task_run, state) -> bool:
    """Retry I/O errors only; invalid input (``InvalidCase``, ``ValueError``) fails at once."""
    return isinstance(state.result(raise_on_failure=False), OSError)


def stage_task(
    name: str,
    run_name: str | None = None,
    *,
    retries: int = 2,
    delay: float = 1,
    retry_if: Callable = is_transient,
    **options,
):
    """``@task`` with the preset above; ``options`` go to Prefect as they are (tags, timeouts, …)."""
    return task(
        name=name,
        task_run_name=run_name,
        retries=retries,
        retry_delay_seconds=delay,
        retry_condition_fn=retry_if,
        cache_policy=NONE,
        **options,
    )


def run_logger():
    """The run's logger inside a flow or task run; outside one (a task's ``.fn`` called directly), Prefect's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("brats")


def gather(
    futures: Sequence, items: Sequence, progress=None, weight: Callable[[Any], int] = lambda item: 1
) -> tuple[list[Any], list[tuple[Any, str]]]:
    """(results, [(item, one-line error)]) of futures mapped over ``items``, in the order they finish;
    each finished item advances ``progress`` by its ``weight`` (e.g. the cases in a batch)."""
    log = get_run_logger()
    item_of = dict(zip(futures, items))
    results, failures = [], []
    for future in as_completed(futures):
        future.wait()
        if future.state.is_completed():
            results.append(future.result())
        else:
            failures.append((item_of[future], str(future.state.result(raise_on_failure=False))))
            log.error("%s", failures[-1][1])
        if progress is not None:
            progress.advance(weight(item_of[future]))
    return results, failures


def final_states(runs: Sequence, poll_s: float = 5.0) -> list:
    """The final states of flow runs started elsewhere (``run_deployment(..., timeout=0)``), once
    every one of them has one: what a flow waits for when its parts run as runs of a deployment."""
    import time

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while True:
            states = [client.read_flow_run(r.id).state for r in runs]
            if all(s.is_final() for s in states):
                return states
            time.sleep(poll_s)
