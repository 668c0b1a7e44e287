"""The train flow for real: Prefect test API, the small synthetic store, a registry on disk."""

from __future__ import annotations

import json

import pytest
import torch
from prefect.artifacts import Artifact

from flows.cli.main import main as brats
from flows.train import train
from storage.registry import Registry
from storage.store import SliceStore
from tasks.train import train_model
from tasks.versions import open_version
from unet.checkpoint import RegistryCheckpoint, load_model
from unet.config import TrainConfig
from unet.model import UNetConfig
from unet.postprocess import DICE_TIE, ET_MIN_ML, MIN_ISLAND_ML
from unet.train import Callbacks, fit

NETWORK = UNetConfig(base_channels=4, depth=2, padding="same")
TRAINING = TrainConfig(epochs=2, batch_size=8, max_steps_per_epoch=3, checkpoint_every=2, workers=0, lr=3e-3)
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*argv: str) -> int:
    return brats(list(argv))


def test_brats_train_registers_a_version_that_learned_with_its_artifacts(prefect_api, small_store, tmp_path, capsys):
    models = str(tmp_path / "models")
    rc = cli(
        "train",
        "--store",
        small_store,
        "--registry",
        models,
        "--epochs",
        "12",
        "--base-channels",
        "8",
        "--depth",
        "3",
        "--padding",
        "same",
        "--batch-size",
        "8",
        "--class-weight-power",
        "0.5",
        "--oversample-tumour",
        "2",
        "--workers",
        "0",
        "--lr",
        "3e-3",
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    version = out["version"]
    registry = Registry(models)
    info = registry.info(version)
    store = SliceStore(small_store)
    assert info["status"] == "complete" and out["best"] is True and registry.best() == version
    assert info["model"] == {
        "in_channels": 4,
        "num_classes": 4,
        "base_channels": 8,
        "depth": 3,
        "padding": "same",
        "norm": None,
        "context": 0,
        "deep_supervision": False,
        "outputs": "classes",
        "dropout": 0.0,
    }
    assert info["profile"] == "full" and info["store"] == small_store
    assert info["store_fingerprint"] == store.fingerprint and info["split"] == store.split
    assert info["train_config"]["epochs"] == 12 and info["train_config"]["class_weight_power"] == 0.5
    assert [r["epoch"] for r in info["history"]] == list(range(1, 13))
    assert set(info["packages"]) == {"python", "torch", "prefect", "numpy", "zarr"}
    # it learned: an untrained network scores WT below 0.15 here (tests/test_train.py); and it passed the floor
    assert info["metrics"]["dice_WT"] == out["metrics"]["dice_WT"] and info["metrics"]["dice_WT"] > 0.5
    # post-processing chosen on the validation cases, every candidate scored, recorded with the version
    assert (
        set(info["postprocess"]) == {"min_island_ml", "et_min_ml"}
        and out["postprocess"]["postprocess"] == info["postprocess"]
    )
    choice = info["postprocess_choice"]
    assert choice["cases"] == len(store.split["val"]) and choice["on"] == "validation"
    assert len(choice["tried"]) == len(MIN_ISLAND_ML) + len(ET_MIN_ML)
    assert choice["mean_dice_after"] >= max(t["mean_dice"] for t in choice["tried"]) - DICE_TIE
    assert choice["mean_dice_after"] >= choice["mean_dice_before"] - DICE_TIE
    assert any(t["mean_hd95"] is not None for t in choice["tried"])  # the near-ties, settled by HD95
    for name in ("curves.png", "overlay-1.png", "overlay-2.png", "overlay-3.png"):
        assert registry.get(version, name).startswith(PNG), name
    assert RegistryCheckpoint(registry, version).load()["epoch"] == 12
    model, loaded = load_model(registry)  # the best version, weights_only
    assert loaded.version == version
    assert model.predict(torch.zeros(1, 4, 64, 64)).shape == (1, 4, 64, 64)

    rows = Artifact.get("train-epochs").data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [r["epoch"] for r in rows] == list(range(1, 13))
    artifact = Artifact.get("train-summary")
    summary = artifact.data
    assert version in summary and "curves.png" in summary and "overlay-1.png" in summary
    assert summary.count("](data:image/png;base64,") == 4  # curves + 3 overlays inline
    assert (
        "file://" not in summary and f"`{models}/{version}/`" in summary
    )  # paths as text: no link a browser cannot open
    assert "Post-processing chosen on" in summary
    assert Artifact.get("train-progress").data == 100.0
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # on the flow run, where a person looks, not on a task run
        stored = client.read_artifacts(limit=200)
    (mine,) = [a for a in stored if a.id == artifact.id]
    assert mine.flow_run_id is not None and mine.task_run_id is None

    assert cli("models", "list", "--registry", models) == 0
    listing = capsys.readouterr().out
    assert any(line.startswith("*") and version in line and "complete" in line for line in listing.splitlines())


def test_restarted_flow_continues_the_unfinished_version(prefect_api, small_store, tmp_path):
    models = str(tmp_path / "models")
    version, attempt = open_version.fn(models, small_store, NETWORK, TRAINING)
    assert attempt == 1

    class Crash(Callbacks):  # the first run dies at step 3, after its checkpoint at step 2
        def on_step(self, epoch, step, global_step):
            if global_step == 3:
                raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError):
        fit(small_store, NETWORK, TRAINING, RegistryCheckpoint(Registry(models), version), Crash())

    result = train(small_store, models, NETWORK, TRAINING)  # a new flow run with the same parameters
    assert result["version"] == version and result["resumed_from"] == {"epoch": 1, "step": 2}
    assert result["epochs"] == 2 and result["steps"] == 6
    assert Registry(models).info(version)["status"] == "complete"
    # finished versions are not reopened; --fresh or another plan never reopens
    again, attempt = open_version.fn(models, small_store, NETWORK, TRAINING)
    assert attempt == 1 and again != version
    fresh, attempt = open_version.fn(models, small_store, NETWORK, TRAINING, fresh=True)
    assert attempt == 1 and fresh not in (version, again)
    other = TRAINING.model_copy(update={"lr": 1e-2})
    assert open_version.fn(models, small_store, NETWORK, other)[0] not in (version, again, fresh)
    # the newest unfinished version of the same plan is reopened; runtime settings may differ
    assert open_version.fn(models, small_store, NETWORK, TRAINING.model_copy(update={"workers": 3})) == (fresh, 2)


def test_a_retried_task_resumes_from_its_checkpoint(prefect_api, small_store, tmp_path, monkeypatch):
    models = str(tmp_path / "models")
    version, _ = open_version.fn(models, small_store, NETWORK, TRAINING)

    real_put, saves = Registry.put, []

    def flaky(self, version, name, data):  # the object store drops the second checkpoint write
        if name == "checkpoint.pt":
            saves.append(name)
            if len(saves) == 2:
                raise OSError("injected: connection reset by object store")
        return real_put(self, version, name, data)

    monkeypatch.setattr(Registry, "put", flaky)
    state = train_model.with_options(retry_delay_seconds=0)(
        small_store, models, version, NETWORK, TRAINING, return_state=True
    )
    assert state.is_completed(), state
    summary = state.result()
    assert summary["resumed_from"] == {"epoch": 1, "step": 2}  # not a restart from step 0
    assert summary["epochs"] == 2 and summary["steps"] == 6


def test_a_device_that_is_not_there_fails_the_run_at_once_with_nothing_registered(prefect_api, small_store, tmp_path):
    missing = f"cuda:{torch.cuda.device_count()}"
    training = TRAINING.model_copy(update={"device": missing})
    state = train(small_store, str(tmp_path / "models"), NETWORK, training, return_state=True)
    assert state.is_failed() and f"device '{missing}' asked for" in state.message
    assert (
        Registry(str(tmp_path / "models")).versions() == []
    )  # failed before a version was opened: no retries, no leftovers


def test_the_pipeline_run_has_its_own_summary_linking_each_stage(prefect_api, small_raw, tmp_path):
    from flows.pipeline import pipeline
    from unet.preprocess import Preprocessing

    state = pipeline(
        [str(small_raw)],
        str(tmp_path / "s.zarr"),
        str(tmp_path / "models"),
        Preprocessing(split_ratios=(0.5, 0.25, 0.25)),
        NETWORK,
        TRAINING,
        return_state=True,
    )
    assert state.is_completed(), state.message
    summary = Artifact.get("pipeline-summary")
    assert summary.flow_run_id == state.state_details.flow_run_id  # the pipeline run's own artifact
    for stage in ("ingest", "train", "evaluate"):  # each stage's run, and its summary artifact's own page
        page = Artifact.get(f"{stage}-summary")
        assert f"| {stage} | [{stage} run](" in summary.data
        assert f"[{stage}-summary](" in summary.data and f"/artifacts/artifact/{page.id})" in summary.data
    assert "?tab=" not in summary.data
    assert state.result()["train"]["version"] in summary.data
