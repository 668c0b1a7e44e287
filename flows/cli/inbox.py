"""``brats inbox``: where each scan of an inbox stands, for a person.

    brats inbox INBOX [INBOX ...] --out OUT [--registry M]

One row per folder (``storage.inbox.standing``): incomplete (why), pending, failed (why: the one-line
reason its last run gave), segmented (by which model version, and whether that is still the best;
``review``: the quality estimate flagged it). The ``sweep`` flow's ``sweep-cases`` artifact shows
the same rows in the UI.
"""

from __future__ import annotations

from flows.cli.registry import format_table
from storage.cases import Naming
from storage.inbox import standing
from storage.registry import DEFAULT_ROOT, Registry

COLUMNS = ("case", "status", "version", "best", "review", "why")


def status(inbox: list[str], out: str, registry_url: str = DEFAULT_ROOT, naming: Naming = "auto") -> int:
    """Where each scan of the inbox stands: incomplete, pending, failed (why), segmented (by which version).

    Args:
        inbox: inbox folders: <case>/ or {HGG,LGG}/<case>/ with the four modalities
        out: the folder inference writes the segmentations to
    """
    best = Registry(registry_url).best()
    rows = [r for root in inbox for r in standing(root, out, best, naming)]
    if not rows:
        print(f"nothing in {', '.join(inbox)}")
        return 0
    print(format_table([{c: _cell(r.get(c)) for c in COLUMNS} for r in rows], COLUMNS))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pending", "failed", "incomplete", "segmented")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" (best model: {best or 'none'})")
    return 0


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else str(value)
