"""The ``brats`` command, generated from the functions it runs.

Each sub-command runs one function — a flow, or a plain command (``synth``, ``models``, ``watch``,
``submit``) — and its options are that function's parameters, read from the JSON schema Prefect
renders as the run form in the UI (``parameter_schema``): the signature gives names, types and
defaults, the docstring's ``Args`` and the pydantic sections' ``Field``s the descriptions. So
every setting is defined once, and the command line, the UI form, ``deploy/prefect.yaml`` and the
triggers reach it by the same name. A section's fields are options of their own (``--epochs`` sets
``training.epochs``; a name two sections share is prefixed with the later one's: ``--prediction-
device``); an option not given keeps the model's default.

    brats COMMAND --help     every option, its default and its description
    brats --debug COMMAND …  a traceback instead of the one-line error

Commands that run flows get a Prefect API for their whole duration: the configured server, or an
ephemeral one (``flows.cli.embedded``). ``watch`` and ``submit`` send events, which only a real server
acts on: without one configured they refuse at once, before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from flows.cli.memory import keep_freed_memory
from flows.cli.options import add_options, parameters, renamed


@dataclass(frozen=True)
class Command:
    target: str  # "module:function"
    help: str
    positional: tuple[str, ...] = ()  # parameters taken as positional arguments
    flags: dict[str, str] = field(default_factory=dict)  # parameter or section field -> another flag that also sets it
    api: bool = True  # runs flows: needs a Prefect API (an ephemeral one when none is configured)
    server: bool = False  # sends events: needs a configured Prefect server

    def function(self):
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


# what the commands that read raw folders take; --split-ratios (train/val/test shares) was --split, which
# evaluate uses for a split's name: the old spelling still works where people type it
RAW = dict(positional=("raw",), flags={"split_ratios": "--split"})

COMMANDS: dict[str, Command | dict[str, Command]] = {
    "synth": Command(
        "flows.demo:synth",
        "write synthetic BraTS 2019 cases in the official layout",
        positional=("out",),
        flags={"with_seg": "--seg"},
        api=False,
    ),
    "ingest": Command("flows.ingest:ingest", "raw BraTS folders -> normalized slices in a Zarr store (Dask)", **RAW),
    "train": Command("flows.train:train", "train the U-Net on a slice store; registers a model version"),
    "models": {
        "list": Command(
            "flows.cli.registry:list_versions", "every version; * marks the one inference uses by default", api=False
        ),
        "show": Command("flows.cli.registry:show", "a version's info.json", positional=("version",), api=False),
        "best": Command(
            "flows.cli.registry:best", "make a version the default for inference", positional=("version",), api=False
        ),
    },
    "evaluate": Command(
        "flows.evaluate:evaluate", "BraTS metrics (Dice, HD95, sens/spec) of a model on a split of the store"
    ),
    "infer": Command(
        "flows.infer:infer",
        "segment new scans: <out>/<case>_seg.nii.gz on the input grid + <case>.json",
        positional=("inputs",),
    ),
    "pipeline": Command("flows.pipeline:pipeline", "ingest -> train -> evaluate on existing raw data", **RAW),
    "demo": Command("flows.demo:demo", "synthetic data -> ingest -> train -> evaluate -> infer, all on this machine"),
    "watch": Command(
        "flows.cli.events:watch",
        "watch an inbox; emit brats.scan.arrived for each complete new scan",
        positional=("inbox",),
        api=False,
        server=True,
    ),
    "submit": Command(
        "flows.cli.events:submit",
        "emit brats.scan.arrived by hand for case folder(s) or every case under a root",
        positional=("paths",),
        api=False,
        server=True,
    ),
    "serve": Command(
        "flows.cli.served:serve",
        "segment each scan sent by `submit --served` / `watch --served` with the model kept warm (seconds)",
        api=False,
        server=True,
    ),
    "inbox": Command(
        "flows.cli.inbox:status",
        "where each scan of an inbox stands: incomplete, pending, failed (why), segmented (by which version)",
        positional=("inbox",),
        api=False,
    ),
    "worker": Command(
        "flows.cli.worker:work",
        "a process worker of a pool; stopped (SIGTERM, Ctrl-C) it finishes its runs, stopped twice it hands them back",
        api=False,
        server=True,
    ),
    "sweep": Command(
        "flows.sweep:sweep",
        "segment every complete scan in an inbox not yet segmented by the current model",
        positional=("inbox",),
        flags={"settle_s": "--settle", "grace_s": "--grace"},
    ),
}
RUNNER = "flows.ingest:ingest"  # the flow whose Dask cluster the command line may choose (others: $BRATS_DASK_ADDRESS)


# ------------------------------------------------------------------ running


def configured_api() -> str | None:
    """PREFECT_API_URL from the environment or the active Prefect profile, without importing Prefect."""
    if url := os.environ.get("PREFECT_API_URL"):
        return url
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    try:
        profiles = tomllib.loads((home / "profiles.toml").read_text())
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")


def report(state) -> int:
    """Print a flow run's final state for a person; exit code 0 only when it Completed."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    if not state.is_completed():
        print(f"{state.name}: {state.message}", file=sys.stderr)
        return 1
    return 0


def one_line(error: BaseException) -> str:
    errors = getattr(error, "errors", None)  # a pydantic ValidationError: one clause per field
    if callable(errors) and type(error).__name__ == "ValidationError":
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors())
    return " ".join(str(error).split())


class _OneLine(logging.Filter):
    """On the console, a failed run is its one-line message: the traceback stays in the run's logs in
    the UI (``--debug`` shows it here too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def one_line_console() -> None:
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not any(isinstance(f, _OneLine) for f in handler.filters):
                handler.addFilter(_OneLine())


def run(name: str, command: Command, argv: list[str], debug: bool) -> int:
    asks_help = bool({"-h", "--help"} & set(argv))
    if command.server and not configured_api() and not asks_help:
        raise ValueError(
            "no Prefect server configured (set PREFECT_API_URL): events sent to a temporary API would trigger nothing"
        )
    server = None
    if command.api and not configured_api() and not asks_help:
        from flows.cli.embedded import EphemeralAPI

        server = EphemeralAPI.start()  # comes up while the flow is imported and its options parsed
    try:
        return _run(name, command, argv, debug, server)
    finally:
        if server is not None:
            server.stop()


def _run(name: str, command: Command, argv: list[str], debug: bool, server) -> int:
    fn = command.function()
    parser = argparse.ArgumentParser(
        prog=f"brats {name}", description=(getattr(fn, "fn", fn).__doc__ or command.help).split("\n\n")[0]
    )
    add_options(parser, fn, command)
    if command.target == RUNNER:
        parser.add_argument(
            "--dask-address",
            dest="_dask_address",
            metavar="ADDRESS",
            help="an existing Dask scheduler (default: a LocalCluster, or $BRATS_DASK_ADDRESS)",
        )
        parser.add_argument(
            "--workers",
            dest="_workers",
            metavar="N",
            type=int,
            help="LocalCluster workers (default: one per core)",
        )
    args = parser.parse_args(argv)
    kwargs = parameters(args)
    if not command.api:
        return fn(**kwargs) or 0
    from flows.cli.embedded import prefect_api
    from tasks.runners import dask_runner

    if command.target == RUNNER and (args._dask_address or args._workers):
        fn = fn.with_options(task_runner=dask_runner(args._dask_address, args._workers))
    with prefect_api(server):
        if not debug:
            one_line_console()
        return report(fn(**kwargs, return_state=True))


def usage(commands: dict, prog: str = "brats") -> str:
    width = max(map(len, commands))
    lines = [f"usage: {prog} [--debug] COMMAND [OPTIONS]  ({prog} COMMAND --help for its options)", "", "commands:"]
    for name, c in commands.items():
        text = c.help if isinstance(c, Command) else "; ".join(f"{sub}: {s.help}" for sub, s in c.items())
        lines.append(f"  {name.ljust(width)}  {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    argv = renamed(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv[:1]
    argv = argv[1:] if debug else argv
    name, commands, prog = "", COMMANDS, "brats"
    while argv and isinstance(commands, dict) and argv[0] in commands:
        name, commands, prog = f"{name} {argv[0]}".strip(), commands[argv[0]], f"{prog} {argv[0]}"
        argv = argv[1:]
    if isinstance(commands, dict):  # no (known) command given
        print(usage(commands, prog), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    try:
        return run(name, commands, argv, debug)
    except (FileNotFoundError, ValueError, OSError) as e:  # bad input or config: one line, no traceback
        if debug:
            raise
        print(f"brats {name}: {one_line(e)}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``brats`` program: ``main`` with freed memory kept for reuse (``keep_freed_memory``), then exit
    without the interpreter's last garbage collection, which would walk every object Prefect, Dask and
    torch made (~0.8 s here). Reference counting still frees them, and atexit handlers still run."""
    keep_freed_memory()
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
