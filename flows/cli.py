"""The ``brats`` command. Each stage's flow module adds its own sub-command (``add_command``);
one that runs flows gets a Prefect API for its whole duration (``flows.embedded.prefect_api``)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from flows.embedded import prefect_api

# stage modules that register a sub-command, in the order `brats --help` lists them
COMMANDS = ["flows.synth", "flows.ingest", "flows.train", "flows.models", "flows.evaluate", "flows.infer", "flows.pipeline", "flows.events"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="brats", description="BraTS brain-tumour segmentation pipeline (Prefect 3)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = parser().parse_args(argv)
    try:
        if not getattr(args, "api", True):  # file-only commands (synth, models) need no Prefect API
            return args.run(args) or 0
        with prefect_api():
            return args.run(args) or 0
    except (FileNotFoundError, ValueError) as e:  # bad input: one line, no traceback
        print(f"brats {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
