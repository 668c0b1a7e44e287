"""A warm start for flow runs: the worker's flow-run processes forked from one that has already
imported Prefect and torch, instead of each paying for the imports (≈ 3 s of a triggered scan's
segmentation on 2 cores).

    brats worker --pool cpu          # starts `python -m flows.cli.warm serve SOCKET` beside itself

The worker runs each flow run with the command ``python -m flows.cli.warm`` (the *launcher*) where
Prefect would run ``python -m prefect.engine``. The launcher imports nothing heavy: it hands its
environment, working folder, arguments and standard streams to the warm process over a Unix socket
(``BRATS_WARM_ENGINE``), and that forks a child which takes them over and runs ``prefect.engine``
as the command would have. To the worker the launcher *is* the flow run's process:

* its exit status is the child's (1 for a child that died without saying, e.g. killed);
* SIGTERM and SIGINT to it reach the child (a cancelled run ends as Prefect ends it);
* killed outright, the child sees its socket close and kills itself: nothing keeps running unseen.

The warm process preloads third-party modules only (``PRELOAD``). The project's own modules, which
read settings such as ``BRATS_MODELS`` from the environment when imported, are imported by each
child under the flow run's own environment; Prefect's settings are rebuilt from it. Without a warm
process (its socket unset or gone), or when it hangs up without taking the run, the launcher becomes
``python -m prefect.engine`` itself. The
warm process imports what was installed when it started: restart the worker after an upgrade.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

SOCKET_ENV = "BRATS_WARM_ENGINE"
# what a flow run's process would otherwise import first, heaviest first (python -X importtime)
PRELOAD = ("torch", "prefect.flow_engine", "prefect.engine", "zarr", "nibabel", "scipy.ndimage", "numpy")
HEADER = struct.Struct("!I")  # the request's length, before its JSON


def launch() -> None:
    """The flow run's process, as the worker starts it: handed to the warm process, or a plain engine."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(os.environ[SOCKET_ENV])
        request = json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv[1:]}).encode()
        socket.send_fds(conn, [HEADER.pack(len(request)) + request], [0, 1, 2])
        reply = conn.makefile("rb")
        child = int(reply.readline() or 0)  # the child says its pid first
    except (KeyError, OSError, ValueError):
        child = 0
    if not child:  # no warm process, or it could not take the run: start it as Prefect would
        os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *sys.argv[1:]])

    def forward(signum, frame) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = reply.readline().strip()  # empty: the child died without a word (killed)
    sys.exit(int(status) if status else 1)


def serve(path: str) -> None:
    """Preload, then fork a child per launcher that connects to ``path``; runs until killed, or until
    the worker that started it is gone."""
    import importlib

    parent = os.getppid()
    for name in PRELOAD:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.settimeout(1.0)
    print(f"warm engine: {', '.join(PRELOAD)} imported; forking flow runs from {path}", flush=True)
    while os.getppid() == parent:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        try:
            request, fds = receive(conn)
        except (OSError, ValueError) as e:
            print(f"warm engine: a launcher's request was unreadable ({e})", flush=True)
            conn.close()
            continue
        if os.fork() == 0:
            listener.close()
            child(conn, request, fds)
        for fd in fds:
            os.close(fd)
        conn.close()


def receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """A launcher's request and its standard streams' file descriptors."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    if len(fds) != 3 or len(data) < HEADER.size:
        raise ValueError(f"{len(fds)} streams, {len(data)} bytes")
    (size,) = HEADER.unpack_from(data)
    data = data[HEADER.size :]
    while len(data) < size:
        more = conn.recv(size - len(data))
        if not more:
            raise ValueError("the launcher left mid-request")
        data += more
    return json.loads(data), fds


def child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become the launcher's flow-run process, run the engine, report, exit
    (``SystemExit`` out of ``serve``: the interpreter's own exit)."""
    import atexit
    import runpy
    import threading

    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = ["prefect.engine", *request["argv"]]
    conn.sendall(f"{os.getpid()}\n".encode())
    threading.Thread(target=die_with_launcher, args=(conn,), daemon=True).start()

    from prefect.context import refresh_global_settings_context
    from prefect.logging.configuration import setup_logging

    refresh_global_settings_context()  # Prefect's settings from the flow run's environment
    setup_logging(incremental=False)
    code = 0
    try:
        runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    # Exit as the engine's own process would, so that what Prefect sends at exit (the last logs,
    # events such as brats.segmentation.review) is sent; the launcher hears the status after that.
    atexit.register(lambda: conn.sendall(f"{code}\n".encode()))
    sys.exit(code)


def die_with_launcher(conn: socket.socket) -> None:
    """The launcher never writes after its request: end of file means it is gone, and so goes its run."""
    while conn.recv(1):
        pass
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
    else:
        launch()
