"""``brats models``: the model registry for a person — list versions, show one, choose the best.

    brats models list            every version: status, network, validation Dice; * marks BEST
    brats models show VERSION    its info.json
    brats models best VERSION    make VERSION the default for inference

Training marks BEST itself, like for like (``storage.versions.promotion``: a version must beat BEST
on the held-out cases both were scored on, above a floor); ``best`` overrides that by hand.
"""

from __future__ import annotations

import json
import time

from storage.registry import DEFAULT_ROOT, Registry
from storage.versions import ModelVersion, listed

COLUMNS = (
    "",
    "version",
    "created",
    "kind",
    "status",
    "trained",
    "network",
    "profile",
    "measure",
    "cases",
    "dice_WT",
    "dice_TC",
    "dice_ET",
    "dice_mean",
    "test",
)


def rows(registry: Registry) -> list[dict]:
    """One row per version, oldest first: what it is, and the measure BEST is chosen on (its per-case
    score on held-out cases: validation or out of fold, how many) beside its test evaluation."""
    out, best = [], registry.best()
    for info in listed(registry):
        m, metrics, t = info.model, info.metrics, info.train_config
        if info.kind == "ensemble":
            trained = f"{len(info.members)} folds"
        elif t.get("epochs"):
            trained = f"{info.epochs_done}/{t['epochs']} epochs" + (
                f", fold {info.fold}" if info.fold is not None else ""
            )
        else:
            trained = ""
        ev = (info.evaluation or {}).get("summary", {})
        regions = [ev[f"dice_{r}"]["mean"] for r in ("WT", "TC", "ET") if f"dice_{r}" in ev]
        test = f"{info.evaluation['split']} {sum(regions) / 3:.3f}" if len(regions) == 3 else ""
        out.append(
            {
                "": "*" if info.version == best else "",
                "version": info.version,
                "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created)),
                "kind": info.kind,
                "status": info.status,
                "trained": trained,
                "network": f"base {m.get('base_channels')} depth {m.get('depth')} {m.get('padding')}" if m else "",
                "profile": info.profile or "",
                "measure": info.score.measure if info.score else "",
                "cases": str(len(info.score.cases)) if info.score else "",
                **{
                    k: f"{metrics[k]:.3f}" if k in metrics else ""
                    for k in ("dice_WT", "dice_TC", "dice_ET", "dice_mean")
                },
                "test": test,
            }
        )
    return out


def format_table(table: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    widths = {c: max([len(c)] + [len(str(r[c])) for r in table]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in table]
    return "\n".join(line.rstrip() for line in lines)


def list_versions(registry_url: str = DEFAULT_ROOT) -> int:
    """Every version of the registry; * marks the one inference uses by default.

    Args:
        models: model registry: a local path or an fsspec URL (env BRATS_MODELS)
    """
    table = rows(Registry(registry_url))
    print(format_table(table) if table else f"no model versions in {registry_url} (train one with `brats train`)")
    return 0


def show(version: str, registry_url: str = DEFAULT_ROOT) -> int:
    """A version's info.json.

    Args:
        version: version id, best or latest
        models: model registry: a local path or an fsspec URL (env BRATS_MODELS)
    """
    info = ModelVersion.resolve(registry_url, version).info.model_dump(mode="json")
    print(json.dumps({**info, "history": f"{len(info['history'])} epochs"}, indent=2))
    return 0


def best(version: str, registry_url: str = DEFAULT_ROOT) -> int:
    """Make a version the default for inference.

    Args:
        version: version id or latest
        models: model registry: a local path or an fsspec URL (env BRATS_MODELS)
    """
    model = ModelVersion.resolve(registry_url, version)
    version = model.version
    if model.info.status != "complete":
        raise ValueError(f"{version} has not finished training")
    model.promote()
    print(f"{version} is now the best model")
    return 0
