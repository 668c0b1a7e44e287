"""The ``brats`` command: generated from the flows' parameters, one-line errors, a quiet console."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli.main import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def help_text(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def fields(model) -> set[str]:
    return {name for name in model.model_fields}


def test_every_field_of_every_section_is_an_option_of_its_command(capsys):
    from unet.config import TrainConfig
    from unet.model import UNetConfig
    from unet.predict import Prediction
    from unet.preprocess import Preprocessing

    expected = {
        ("ingest",): fields(Preprocessing) | {"store", "store_url"},
        ("train",): fields(UNetConfig) | fields(TrainConfig) | {"store", "registry", "fresh", "fold", "recipe"},
        ("evaluate",): fields(Prediction) | {"store_url", "version", "registry_url", "split"},
        ("infer",): fields(Prediction) | {"out", "version", "registry", "naming", "et_label"},
        ("sweep",): fields(Prediction) | {"out", "version", "registry", "naming", "et_label", "settle_s", "grace_s"},
        ("pipeline",): fields(Preprocessing)
        | fields(UNetConfig)
        | fields(TrainConfig)
        | {"store", "registry", "evaluate_split", "recipe"},
        ("models", "list"): {"registry"},
    }
    for command, names in expected.items():
        text = help_text(capsys, *command)
        for name in names:
            flag = f"--{name.replace('_', '-')}"
            assert flag in text or f"--prediction-{name.replace('_', '-')}" in text, (command, flag)
    # a field's description and default come from its one definition
    train = help_text(capsys, "train")
    assert "number of 2x2 max-pools (paper: 4) (default: 4)" in " ".join(train.split())
    assert "{valid,same}" in train and "--no-fine-labels" in train
    assert "{off,light,strong,scanner,gin,drop,drop-but-t1ce}" in train


@pytest.mark.parametrize(
    "argv,dest,value",
    [
        (
            ["ingest", "RAW", "--store", "S", "--split-ratios", "0.5", "0.25", "0.25"],
            "data.split_ratios",
            [0.5, 0.25, 0.25],
        ),
        (["ingest", "RAW", "--store", "S", "--split", "0.5", "0.25", "0.25"], "data.split_ratios", [0.5, 0.25, 0.25]),
        (["train", "--store", "S", "--augment", "off"], "training.augment", "off"),
        (["train", "--store", "S", "--class-weight-power", "none"], "training.class_weight_power", None),
        (["infer", "IN", "--out", "O", "--no-tta"], "prediction.tta", False),
        (["infer", "IN", "--out", "O", "--et-label", "3"], "et_label", 3),
        (["sweep", "IN", "--out", "O", "--settle", "5", "--grace", "7"], "grace_s", 7.0),
        (["synth", "OUT", "--no-seg"], "with_seg", False),
    ],
)
def test_todays_flag_names_keep_working(argv, dest, value):
    import argparse

    from flows.cli.main import Command
    from flows.cli.options import add_options

    command: Command = COMMANDS[argv[0]]
    parser = argparse.ArgumentParser()
    add_options(parser, command.function(), command)
    assert getattr(parser.parse_args(argv[1:]), dest) == value


def test_submit_and_watch_refuse_at_once_without_a_server(tmp_path):
    """Nothing heavy is imported before the refusal: no Prefect, no temporary API started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path)  # no profile naming a server either
    code = "import sys; from flows.cli.main import main; rc = main(sys.argv[1:]); print(rc, 'prefect' in sys.modules)"
    for argv in (["submit", str(tmp_path)], ["watch", str(tmp_path)]):
        done = subprocess.run(
            [sys.executable, "-c", code, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"brats {argv[0]}: no Prefect server configured (set PREFECT_API_URL)")
    for command in ("submit", "watch", "worker"):  # their help needs no server
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", command, "--help"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and done.stdout.startswith(f"usage: brats {command}"), done.stderr[-2000:]


def test_a_failing_command_ends_with_one_line_and_no_traceback(prefect_api, small_store, tmp_path, capfd):
    from storage.store import SliceStore

    assert main(["train", "--store", small_store, "--registry", str(tmp_path / "m"), "--device", "cuda:7"]) == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("Failed: ")
    assert "device 'cuda:7' asked for" in err.strip().splitlines()[-1]

    SliceStore(small_store)  # a store whose split has no such part
    assert main(["evaluate", "--store", small_store, "--registry", str(tmp_path / "m"), "--split", "holdout"]) != 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "no model marked best" in err.strip().splitlines()[-1]

    assert main(["ingest", str(tmp_path / "missing"), "--store", str(tmp_path / "s.zarr")]) != 0
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert "cannot read raw root" in last and str(tmp_path / "missing") in last


def test_the_console_shows_run_lines_not_dask_chatter(small_raw, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {
        "PREFECT_HOME": str(tmp_path / "home"),
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "brats"),
            "ingest",
            str(small_raw),
            "--store",
            str(tmp_path / "s.zarr"),
            "--workers",
            "2",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "Finished in state Completed" in out and '"ingested": 6' in out
    assert not re.search(r"distributed\.(scheduler|nanny|worker|core|http)", out)  # Dask's own INFO lines
    assert "dashboard" not in out.lower()


def test_earlier_spellings_still_work_with_a_note(capsys):
    from flows.cli.options import renamed

    assert renamed(["infer", "IN", "--models", "M", "--model=v1", "--out", "O"]) == [
        "infer",
        "IN",
        "--registry",
        "M",
        "--version=v1",
        "--out",
        "O",
    ]
    err = capsys.readouterr().err
    assert "--models is now --registry" in err and "--model is now --version" in err


@pytest.mark.parametrize(
    "poll,env,expected",
    [
        (None, {}, 2.0),
        (None, {"PREFECT_WORKER_QUERY_SECONDS": "7"}, 7.0),
        (1.0, {"PREFECT_WORKER_QUERY_SECONDS": "7"}, 1.0),
    ],
)
def test_the_worker_polls_as_often_as_asked_and_by_default_every_2_s(poll, env, expected):
    """``brats worker --poll``: the interval reaches Prefect's own worker settings in the worker's process."""
    from flows.cli.worker import worker_env

    base = {k: v for k, v in os.environ.items() if k != "PREFECT_WORKER_QUERY_SECONDS"}
    read = "from prefect.settings import get_current_settings; print(get_current_settings().worker.query_seconds)"
    out = subprocess.run(
        [sys.executable, "-c", read], env=worker_env({**base, **env}, poll), capture_output=True, text=True
    )
    assert float(out.stdout.strip()) == expected, out.stderr[-2000:]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "runs/models"),
        ({"BRATS_DATA": "/srv/brats"}, "/srv/brats/models"),  # bootstrap.sh: BRATS_STORAGE defaults to it
        ({"BRATS_DATA": "/srv/brats", "BRATS_STORAGE": "s3://brats/"}, "s3://brats/models"),
        ({"BRATS_STORAGE": "/data", "BRATS_MODELS": "/elsewhere"}, "/elsewhere"),
    ],
)
def test_the_command_finds_the_models_where_the_deploy_puts_them(env, expected):
    from storage.registry import default_root

    assert default_root(env) == expected
