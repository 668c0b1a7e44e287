"""The GPU check (``benchmarks/gpu.py``) in its tiny configuration on the CPU: every step (the flows end
to end, the train/loader and batch-inference benchmarks) passes and prints its figure, and the model
it trains has learnt the synthetic tumours."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, child_env


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_in_its_tiny_configuration(tmp_path):
    work = tmp_path / "work"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu", "--work", str(work)],
        cwd=ROOT,
        env=child_env(PREFECT_HOME=str(tmp_path / "home")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = {m[0]: m[1:] for m in re.findall(r"^\| ([a-z +]+) \| ([\d.]+) \| (\w+) \| (.*) \|$", done.stdout, re.M)}
    assert set(rows) == {
        "synth",
        "synth new scans",
        "ingest",
        "train flow",
        "evaluate flow",
        "infer flow",
        "train step + loader",
        "batch inference",
    }
    assert all(result == "ok" for _, result, _ in rows.values())
    assert rows["ingest"][2] == "4" and re.fullmatch(r"[\d.]+ slices/s", rows["train flow"][2])
    # 60 steps learn the synthetic tumours: an untrained net's whole tumour Dice is near 0 (test_train)
    assert float(rows["evaluate flow"][2]) > 0.4 and float(rows["batch inference"][2]) > 0
    assert rows["train step + loader"][2].startswith("same")
    assert len(list((work / "out").glob("*_seg.nii.gz"))) == 2  # the infer flow's segmentations
