"""``brats models``: the model registry for a person — list versions, show one, choose the best.

    brats models list            every version: status, network, validation Dice; * marks BEST
    brats models show VERSION    its info.json
    brats models best VERSION    make VERSION the default for inference

Training marks BEST itself (the best mean validation Dice); ``best`` overrides that by hand.
"""

from __future__ import annotations

import argparse
import json
import time

from storage.registry import DEFAULT_ROOT, Registry

COLUMNS = ("", "version", "created", "status", "epochs", "network", "profile", "dice_WT", "dice_TC", "dice_ET", "dice_mean")


def rows(registry: Registry) -> list[dict]:
    """One row per version, oldest first."""
    out = []
    for info in registry.versions():
        m, metrics = info.get("model") or {}, info.get("metrics") or {}
        epochs = (info.get("train_config") or {}).get("epochs")
        out.append({
            "": "*" if info.get("best") else "",
            "version": info["version"],
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(info.get("created", 0))),
            "status": info.get("status", ""),
            "epochs": f"{info.get('epochs_done', 0)}/{epochs}" if epochs else "",
            "network": f"base {m.get('base_channels')} depth {m.get('depth')} {m.get('padding')}" if m else "",
            "profile": info.get("profile") or "",
            **{k: f"{metrics[k]:.3f}" if k in metrics else "" for k in ("dice_WT", "dice_TC", "dice_ET", "dice_mean")},
        })  # fmt: skip
    return out


def format_table(table: list[dict]) -> str:
    widths = {c: max([len(c)] + [len(str(r[c])) for r in table]) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS) for r in table]
    return "\n".join(line.rstrip() for line in lines)


def add_command(sub) -> None:
    root = argparse.ArgumentParser(add_help=False)
    root.add_argument("--models", default=DEFAULT_ROOT, help=f"model registry root (default {DEFAULT_ROOT})")
    p = sub.add_parser("models", help="list the model registry's versions, show one, choose the best")
    action = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    action.add_parser("list", parents=[root], help="every version; * marks the one inference uses by default")
    action.add_parser("show", parents=[root], help="a version's info.json").add_argument("version", help="version id, best or latest")
    action.add_parser("best", parents=[root], help="make a version the default for inference").add_argument("version")
    p.set_defaults(run=run_cli, api=False)


def run_cli(args) -> int:
    registry = Registry(args.models)
    if args.action == "list":
        table = rows(registry)
        print(format_table(table) if table else f"no model versions in {args.models} (train one with `brats train`)")
    elif args.action == "show":
        info = registry.info(registry.resolve(args.version))
        print(json.dumps({**info, "history": f"{len(info.get('history', []))} epochs"}, indent=2))
    else:
        version = registry.resolve(args.version)
        if registry.info(version).get("status") != "complete":
            raise ValueError(f"{version} has not finished training")
        registry.set_best(version)
        print(f"{version} is now the best model")
    return 0
