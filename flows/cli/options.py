"""Options of a ``brats`` command from the function it runs: one per parameter, and one per field of
each pydantic section, read from the JSON schema Prefect renders as the run form in the UI
(``parameter_schema``): names, types, defaults and descriptions come from their one definition.
A section's field is ``--name`` (``--epochs`` sets ``training.epochs``); a name two sections share
is prefixed with the later one's (``--prediction-device``); an option not given keeps the default.
"""

from __future__ import annotations

import argparse
import json

SHORT = {"store_url": "--store", "registry_url": "--registry"}  # what a person types, beside the parameter's name
RENAMED = {"--models": "--registry", "--model": "--version"}  # spellings of earlier versions, still taken


def renamed(argv: list[str]) -> list[str]:
    """``argv`` with the earlier spellings of options replaced (``--models M`` or ``--models=M``), each
    replacement noted once on stderr."""
    import sys

    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if flag in RENAMED:
            print(f"brats: {flag} is now {RENAMED[flag]} (the old spelling still works)", file=sys.stderr)
            arg = RENAMED[flag] + eq + value
        out.append(arg)
    return out


def _type(kind: str | None):
    return {"integer": int, "number": float, "boolean": bool}.get(kind or "", str)


def _or_none(convert):
    return lambda text: None if text.lower() in ("none", "null", "") else convert(text)


def _argument(prop: dict) -> dict:
    """argparse keyword arguments for one JSON-schema property."""
    nullable = False
    if "anyOf" in prop:  # X | None
        options = [p for p in prop["anyOf"] if p.get("type") != "null"]
        nullable = len(options) < len(prop["anyOf"])
        prop = {**prop, **options[0]} if len(options) == 1 else {**prop, "type": "string"}
    kind = prop.get("type")
    if "enum" in prop:
        convert = _type(kind) if kind else type(prop["enum"][0])
        kw = {"type": convert, "choices": list(prop["enum"]) + ([None] if nullable else [])}
    elif kind == "boolean":
        return {"action": argparse.BooleanOptionalAction}
    elif kind == "array":
        items = prop.get("prefixItems") or [prop.get("items", {})]
        kw = {"type": _type(items[0].get("type")), "nargs": len(items) if "prefixItems" in prop else "+"}
        if "enum" in items[0]:  # a list of names: each one checked
            kw["choices"] = items[0]["enum"]
    elif kind == "object":
        kw = {"type": json.loads}
    else:
        kw = {"type": _type(kind)}
    if nullable:
        kw["type"] = _or_none(kw["type"])
    return kw


def _help(prop: dict) -> str:
    text = prop.get("description", "")
    if "default" in prop and "(default:" not in text:  # a description may say its default itself
        default = prop["default"]
        text += f" (default: {' '.join(map(str, default)) or 'empty' if isinstance(default, list) else default})"
    return text.replace("%", "%%")


def add_options(parser: argparse.ArgumentParser, fn, command) -> None:
    """One option per parameter of ``fn``, and per field of each pydantic section parameter; ``command``
    (``flows.cli.main.Command``) names the positional ones and the extra flags."""
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(fn).model_dump()
    definitions, required, taken = schema.get("definitions", {}), set(schema.get("required", [])), set()

    def add(group, name: str, dest: str, prop: dict, required: bool, section: str | None = None) -> None:
        kw = {**_argument(prop), "help": _help(prop)}
        if name in command.positional:
            group.add_argument(dest, metavar=name.upper(), **{k: v for k, v in kw.items() if k != "choices" or v})
            return
        flag = name if name not in taken else f"{section}_{name}"
        taken.add(flag)
        flags = [f"--{flag.replace('_', '-')}"] + ([command.flags[name]] if name in command.flags else [])
        flags += [SHORT[name]] if name in SHORT and section is None else []
        if "action" not in kw and "choices" not in kw:
            kw["metavar"] = name.upper()
        group.add_argument(*flags, dest=dest, required=required, default=argparse.SUPPRESS, **kw)

    for name, prop in schema["properties"].items():
        ref = prop.get("$ref") or next((a["$ref"] for a in prop.get("allOf", []) if "$ref" in a), None)
        if ref is None:
            add(parser, name, name, prop, name in required)
            continue
        section = definitions[ref.rsplit("/", 1)[-1]]
        group = parser.add_argument_group(name, section.get("description"))
        for fname, fprop in section["properties"].items():
            add(group, fname, f"{name}.{fname}", fprop, fname in section.get("required", []), name)


def parameters(args: argparse.Namespace) -> dict:
    """The parsed options as the function's keyword arguments (sections as dicts of the given fields)."""
    out: dict = {}
    for dest, value in vars(args).items():
        if dest.startswith("_"):
            continue
        section, _, name = dest.rpartition(".")
        (out.setdefault(section, {}) if section else out)[name] = value
    return out
