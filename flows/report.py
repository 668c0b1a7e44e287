"""How a CLI command reports a finished flow run: its result as JSON, its message when not Completed."""

from __future__ import annotations

import json
import sys


def report(state) -> int:
    """Print a flow run's final state for a person; exit code 0 only when it Completed."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    if not state.is_completed():
        print(f"{state.name}: {state.message}", file=sys.stderr)
        return 1
    return 0
