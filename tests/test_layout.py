"""The house rules, read from the source: layers only point down, no import cycles, no long files,
``storage/`` and ``unet/`` without Prefect, and every module in ``flows/`` (the ``cli`` subpackage
aside) defines a flow or the parameters flows share."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"storage": 0, "unet": 1, "tasks": 2, "flows": 3}  # an import may only point to a lower or equal floor
MAX_LINES = 350


def _modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (at the top or inside functions), and every ``module.name`` it
    imports from one (a submodule, where it is one)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


GRAPH = {name: {m for m in _imports(path) if m in MODULES} - {name} for name, path in MODULES.items()}


def floor(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_layers_only_point_down():
    upward = [(a, b) for a, targets in GRAPH.items() for b in targets if floor(b) > floor(a)]
    assert upward == []


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [module, target])
            elif target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])
    assert cycles == []


def test_no_source_file_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_storage_and_unet_run_without_prefect():
    uses_prefect = [
        name
        for name, path in MODULES.items()
        if floor(name) <= LAYERS["unet"] and "prefect" in {m.split(".")[0] for m in _imports(path)}
    ]
    assert uses_prefect == []


def test_every_flows_module_defines_a_flow_or_shared_parameters():
    def defines_flow(tree: ast.Module) -> bool:
        return any(
            isinstance(d, ast.Call) and getattr(d.func, "id", None) == "flow"
            for node in tree.body
            if isinstance(node, ast.FunctionDef)
            for d in node.decorator_list
        )

    parameters = {"flows.sections", "flows.recipes"}  # the shared parameters; the named sets of sections
    others = [
        name
        for name, path in MODULES.items()
        if name.startswith("flows.")
        and not name.startswith("flows.cli")
        and name not in parameters
        and not defines_flow(ast.parse(path.read_text()))
    ]
    assert others == []


def test_a_model_versions_info_has_one_owner():
    """Only ``storage/`` reads or writes a version's info.json: everything above goes through
    ``storage.versions`` (typed ``VersionInfo``, ``ModelVersion``'s lifecycle), never string keys."""
    raw = ("update_info(", "registry.create(", ".info(", '"info.json"', 'info["', "info.get(")
    offenders = [
        f"{name}: {needle}"
        for name, path in MODULES.items()
        if floor(name) > LAYERS["storage"]
        for needle in raw
        if needle in path.read_text().replace("log.info(", "").replace("logger().info(", "")
    ]
    assert offenders == []


def _functions():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node


def _body_lines(node) -> int:
    """Lines of a function's body, its docstring left out."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def _is_flow(node) -> bool:
    return any(isinstance(d, ast.Call) and getattr(d.func, "id", None) == "flow" for d in node.decorator_list)


def test_functions_do_one_job():
    """No function body over 60 lines, no flow body over 40 (a flow reads as the pipeline: task calls
    and a summary), and no function but a flow or a command over 8 parameters (pass a section or a
    small typed object instead)."""
    long = [f"{m}.{f.name}: {n}" for m, f in _functions() if (n := _body_lines(f)) > 60]
    long_flows = [f"{m}.{f.name}: {n}" for m, f in _functions() if _is_flow(f) and (n := _body_lines(f)) > 40]
    commands = {"flows.cli.events.watch"}  # its parameters are the options of `brats watch`
    many = [
        f"{m}.{f.name}: {n}"
        for m, f in _functions()
        if not _is_flow(f)
        and f"{m}.{f.name}" not in commands
        and (
            n := len(f.args.posonlyargs + f.args.args + f.args.kwonlyargs)
            - (f.args.args[:1] != [] and f.args.args[0].arg in ("self", "cls"))
        )
        > 8
    ]
    assert (long, long_flows, many) == ([], [], [])
