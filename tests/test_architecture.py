"""The package graph stays one-way (docs/architecture.md): curate -> train -> export -> serving -> eval -> console, over
shared modules below them, and no module imports itself back through another. Read from the source,
so a new import that breaks the rule fails here first."""

import ast
import re
from pathlib import Path

from conftest import REPO

SRC = REPO / "src" / "pipeline"
# the layer of each package; modules directly in pipeline/ are shared (0), except the commands on top
LAYERS = {"curate": 1, "train": 2, "export": 3, "serving": 4, "eval": 5, "console": 6}
ON_TOP = {"pipeline.cli", "pipeline.sample_data", "pipeline.preflight", "pipeline.completion"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    if module in ON_TOP:
        return 9
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 2 or parts[1] in LAYERS else 0


def imports() -> dict[str, set[str]]:
    """Every pipeline module and the pipeline modules it imports, at the top or inside a function."""
    graph = {}
    for path in SRC.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pipeline":  # from pipeline import x
                found.update(f"pipeline.{a.name}" for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("pipeline"))
        graph[module_name(path)] = found
    return graph


def test_packages_depend_one_way():
    wrong = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in imports().items()
        for target in targets
        if layer(target) > layer(module)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = imports()

    def cycle_from(start: str, node: str, seen: tuple) -> tuple | None:
        for target in graph.get(node, ()):
            if target == start:
                return (*seen, target)
            if target not in seen and (found := cycle_from(start, target, (*seen, target))):
                return found
        return None

    cycles = {" -> ".join(c) for module in graph if (c := cycle_from(module, module, (module,)))}
    assert not cycles, "\n".join(sorted(cycles))


def test_training_and_export_read_typed_settings_not_string_keys():
    lookups = [
        f"{path.relative_to(REPO)}:{n}"
        for package in ("train", "export")
        for path in (SRC / package).glob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bc\[\"", line)
    ]
    assert not lookups, lookups
