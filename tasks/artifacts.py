"""What a person sees of a run: progress (Prefect UI + terminal bar), tables, markdown with plots.

Artifact keys may hold lowercase letters, digits and dashes only; ``key()`` makes one from any text.
Plots go inline into markdown artifacts as PNG data URIs, which the Prefect UI renders.
"""

from __future__ import annotations

import base64
import re
import sys

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def key(*parts: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def png_markdown(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def table(rows: list[dict], artifact_key: str, description: str) -> None:
    create_table_artifact(table=rows, key=artifact_key, description=description)


def markdown(text: str, artifact_key: str, description: str) -> None:
    create_markdown_artifact(markdown=text, key=artifact_key, description=description)


class RunProgress:
    """Progress of a mapped stage: a progress artifact in the UI and, on a terminal, a bar."""

    def __init__(self, total: int, artifact_key: str, description: str):
        self.total, self.done = max(total, 1), 0
        self.artifact_id = create_progress_artifact(0.0, key=artifact_key, description=description)
        self.bar = Progress(
            TextColumn(description),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=not sys.stderr.isatty(),
            transient=False,
        )
        self.task = self.bar.add_task(description, total=total)
        self.bar.start()

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.bar.advance(self.task, n)
        update_progress_artifact(self.artifact_id, 100.0 * self.done / self.total)

    def close(self) -> None:
        self.bar.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
