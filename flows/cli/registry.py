"""``brats models``: the model registry for a person — list versions, show one, choose the best.

    brats models list            every version: status, network, validation Dice; * marks BEST
    brats models show VERSION    its info.json
    brats models best VERSION    make VERSION the default for inference

Training marks BEST itself (the best mean validation Dice); ``best`` overrides that by hand.
"""

from __future__ import annotations

import json
import time

from storage.registry import DEFAULT_ROOT, Registry

COLUMNS = (
    "",
    "version",
    "created",
    "status",
    "epochs",
    "network",
    "profile",
    "dice_WT",
    "dice_TC",
    "dice_ET",
    "dice_mean",
)


def rows(registry: Registry) -> list[dict]:
    """One row per version, oldest first."""
    out = []
    for info in registry.versions():
        m, metrics = info.get("model") or {}, info.get("metrics") or {}
        epochs = (info.get("train_config") or {}).get("epochs")
        out.append(
            {
                "": "*" if info.get("best") else "",
                "version": info["version"],
                "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(info.get("created", 0))),
                "status": info.get("status", ""),
                "epochs": f"{info.get('epochs_done', 0)}/{epochs}" if epochs else "",
                "network": f"base {m.get('base_channels')} depth {m.get('depth')} {m.get('padding')}" if m else "",
                "profile": info.get("profile") or "",
                **{
                    k: f"{metrics[k]:.3f}" if k in metrics else ""
                    for k in ("dice_WT", "dice_TC", "dice_ET", "dice_mean")
                },
            }
        )
    return out


def format_table(table: list[dict]) -> str:
    widths = {c: max([len(c)] + [len(str(r[c])) for r in table]) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS) for r in table]
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
    registry = Registry(registry_url)
    info = registry.info(registry.resolve(version))
    print(json.dumps({**info, "history": f"{len(info.get('history', []))} epochs"}, indent=2))
    return 0


def best(version: str, registry_url: str = DEFAULT_ROOT) -> int:
    """Make a version the default for inference.

    Args:
        version: version id or latest
        models: model registry: a local path or an fsspec URL (env BRATS_MODELS)
    """
    registry = Registry(registry_url)
    version = registry.resolve(version)
    if registry.info(version).get("status") != "complete":
        raise ValueError(f"{version} has not finished training")
    registry.set_best(version)
    print(f"{version} is now the best model")
    return 0
