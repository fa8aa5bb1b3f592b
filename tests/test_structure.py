"""The shape of the code: imports only go down, recipes read as short loops, public names at the top.

Layers, bottom to top: the ground floor (tensor math, rewards, data, generation, models, run
infrastructure, the evaluation core), then ``recipes/``, then the faces (``cli``, ``report``,
``demo``, ``experiments``). These tests read the source with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cs336_alignment"
FACES = {"cli", "report", "demo", "experiments", "schedule", "__main__"}
ABOVE_GROUND = FACES | {"recipes"}  # what the ground floor must never import
MAX_RECIPE_FUNCTION_LINES = 100
MAX_GRPO_LOOP_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the cs336_alignment modules ``path`` imports anywhere (functions included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # "from . import recipes"
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("cs336_alignment"):
                found.add(arg.value)
    return {m for m in found if m == "cs336_alignment" or m.startswith("cs336_alignment.")}


def _layer(module: str) -> str | None:
    """The top-level part of a package module ("recipes", "cli", ...)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _ground_floor() -> list[Path]:
    return [p for p in _modules() if _layer(_module_name(p)) not in ABOVE_GROUND and p != PACKAGE / "__init__.py"]


def test_the_import_graph_reader_sees_imports_inside_functions():
    # experiments.recipe_classes imports each recipe inside the function; loop.py imports at the top
    assert "cs336_alignment.recipes.grpo" in _imported_modules(PACKAGE / "experiments.py")
    assert {"cs336_alignment.evaluate", "cs336_alignment.recipes.common"} <= _imported_modules(PACKAGE / "recipes" / "loop.py")
    assert _layer("cs336_alignment.recipes.grpo") == "recipes" and _layer("cs336_alignment.report") == "report"


@pytest.mark.parametrize("path", _ground_floor(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_ground_floor_imports_nothing_above_it(path):
    above = {m for m in _imported_modules(path) if _layer(m) in ABOVE_GROUND}
    assert not above, f"{path.relative_to(PACKAGE)} imports {sorted(above)}: nothing below the recipes may"


def test_recipes_import_no_face():
    for path in sorted((PACKAGE / "recipes").glob("*.py")):
        faces = {m for m in _imported_modules(path) if _layer(m) in FACES}
        assert not faces, f"recipes/{path.name} imports {sorted(faces)}"


def _functions(path: Path) -> list[ast.FunctionDef]:
    return [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.FunctionDef)]


def test_no_recipe_function_is_longer_than_a_hundred_lines():
    too_long = []
    for path in sorted((PACKAGE / "recipes").glob("*.py")):
        for fn in _functions(path):
            length = fn.end_lineno - fn.lineno + 1
            if length > MAX_RECIPE_FUNCTION_LINES:
                too_long.append(f"recipes/{path.name}:{fn.lineno} {fn.name} ({length} lines)")
    assert not too_long, too_long


def test_the_grpo_loop_body_fits_on_a_screen():
    train_grpo = next(f for f in _functions(PACKAGE / "recipes" / "grpo.py") if f.name == "train_grpo")
    body = next((n.body for n in train_grpo.body if isinstance(n, ast.With)), train_grpo.body)  # inside `with RunLoop`
    loops = [n for n in body if isinstance(n, ast.For)]
    assert len(loops) == 1, "train_grpo has one loop over GRPO steps"
    length = loops[0].end_lineno - loops[0].lineno + 1
    assert length <= MAX_GRPO_LOOP_LINES, f"the GRPO loop is {length} lines"
    named = {n.id for n in ast.walk(loops[0]) if isinstance(n, ast.Name)}  # called, or passed to timed(...)
    named |= {n.attr for n in ast.walk(loops[0]) if isinstance(n, ast.Attribute)}
    for phase in ("sample_rollouts", "score", "micro_batches", "old_log_probs", "policy_update", "load_weights",
                  "end_of_step"):
        assert phase in named, f"the GRPO loop does not name the {phase} phase"


def _public_definitions(tree: ast.Module) -> list[str]:
    """Top-level functions and classes without a leading underscore, except those a decorator
    registers (CLI commands)."""
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            registered = any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) for d in node.decorator_list)
            if not registered:
                names.append(node.name)
    return names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_public_names_are_listed_at_the_top_of_each_module(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    public = _public_definitions(tree)
    assigned = [n for n in tree.body if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)]
    if not public and not assigned:
        return  # nothing public (__main__, recipes/__init__)
    assert assigned, f"{path.relative_to(PACKAGE)} defines {public} but has no __all__"
    node = assigned[0]
    first_definition = min((n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))), default=None)
    assert first_definition is None or node.lineno < first_definition, "__all__ comes before the first definition"
    if isinstance(node.value, (ast.List, ast.Tuple)):  # the lazy top-level package computes its own
        listed = {e.value for e in node.value.elts}
        missing = [n for n in public if n not in listed]
        assert not missing, f"__all__ of {path.relative_to(PACKAGE)} misses {missing}"
