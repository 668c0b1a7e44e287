"""One Prefect API for every process of a run.

With no ``PREFECT_API_URL`` configured, Prefect starts an ephemeral API inside the process that
runs a flow. Dask worker processes would each start their own, and their task runs would not show
up beside the flow run. ``prefect_api()`` starts the ephemeral API once, up front, and exports its
address so the workers the flow spawns report to it too. With a configured server it does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import PREFECT_API_URL, temporary_settings


@contextmanager
def prefect_api() -> Iterator[str]:
    url = PREFECT_API_URL.value()
    if url:
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=int(os.environ.get("BRATS_API_STARTUP_TIMEOUT", 180)))  # slow on a busy laptop
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
