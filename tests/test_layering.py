"""Lower layers never import upper ones: cli/commands > train, infer, export, eval > data, model > config > utils.

Every `import tunelab.X` / `from tunelab.X import` in the package, at module level or inside functions, is checked.
"""
from __future__ import annotations

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "tunelab"
RANK = {
    "utils": 0, "errors": 0, "config": 1, "data": 2, "model": 2, "estimate": 2,
    "train": 3, "infer": 3, "serve": 3, "export": 3, "eval": 3, "datatools": 3,
    "commands": 4, "cli": 4, "bench": 4, "__init__": 4, "__main__": 4,
    "webui": 4,
}


def _layer(parts: list[str]) -> str:
    return parts[0].removesuffix(".py") if parts else "__init__"


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunelab"):
            yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tunelab"):
                    yield alias.name, node.lineno


def test_no_lower_layer_imports_an_upper_one():
    violations = []
    for path in SRC.rglob("*.py"):
        own = _layer(list(path.relative_to(SRC).parts))
        for module, line in _imports(path):
            if module == "tunelab":  # the package itself: __version__ only (its run() imports lazily)
                continue
            target = module.split(".")[1]
            if target in RANK and RANK[target] > RANK[own]:
                violations.append(f"{path.relative_to(SRC)}:{line} ({own}) imports {module} ({target})")
    assert violations == []


def test_every_package_folder_is_ranked():
    folders = {p.name for p in SRC.iterdir() if p.is_dir() and not p.name.startswith("__") and p.name != "resources"}
    assert folders <= set(RANK)
