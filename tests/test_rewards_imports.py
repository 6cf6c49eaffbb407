"""`rewards/` is the ground floor: it imports nothing of the project above it, and its modules form a DAG.

The imports are read from the source (every `import`, including those inside functions, and the
"rewards.module:Class" strings the catalogue imports lazily), so an import that only runs at call time
cannot hide a cycle or an upward dependency.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REWARDS = ROOT / "rewards"
#: The project's packages and scripts above `rewards`: rewards may import none of them.
UPPER = ("utils", "train_draftplus", "benchmarks", "tests")
#: A lazy import by name, as the catalogue writes it ("rewards.simple:ColorReward").
LAZY_TARGET = re.compile(r"^rewards\.(\w+):\w+$")


def _module_name(path: Path) -> str:
    return "rewards" if path.stem == "__init__" else f"rewards.{path.stem}"


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports (absolute names), wherever in the file the import is."""
    package = "rewards"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # rewards is one flat package: a relative import (level 1) starts at "rewards".
            base = (f"{package}.{node.module}" if node.module else package) if node.level else node.module or ""
            found.add(base)
            # `from . import x` / `from rewards import x` import the module x when there is one.
            for alias in node.names:
                if base == package and (path.parent / f"{alias.name}.py").is_file():
                    found.add(f"{package}.{alias.name}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = LAZY_TARGET.match(node.value)
            if match:
                found.add(f"rewards.{match.group(1)}")
    return found


def import_graph(directory: Path = REWARDS) -> dict[str, set[str]]:
    """rewards module -> every module it imports (all of them, not only rewards modules)."""
    return {_module_name(p): imports_of(p) for p in sorted(directory.glob("*.py"))}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if target.split(".")[0] in UPPER
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the modules of `graph` (as a path that returns to its start), or None."""
    internal = {m: sorted(t for t in targets if t in graph and t != m) for m, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in internal[module]:
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(internal):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_rewards_imports_nothing_above_it():
    assert upward_imports(import_graph()) == []


def test_rewards_modules_import_each_other_without_cycles():
    assert find_cycle(import_graph()) is None


def test_submodules_do_not_import_the_package():
    # `rewards/__init__.py` imports the submodules, so a submodule importing `rewards` is a cycle.
    graph = import_graph()
    assert sorted(m for m, targets in graph.items() if m != "rewards" and "rewards" in targets) == []


def test_the_ground_floor_is_cheap_to_import():
    # utils.hub and utils.errors import rewards' path rule and error base; neither may pull in torch.
    code = (
        "import sys, rewards, utils.hub, utils.errors;"
        "from rewards import RewardError, RewardSpecError, looks_like_path;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_public_name_resolves():
    import rewards
    import utils.hub

    for name in rewards.__all__:
        assert getattr(rewards, name).__name__ == name
    assert set(rewards.__all__) <= set(dir(rewards))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        rewards.no_such_name  # noqa: B018
    assert utils.hub.looks_like_path is rewards.looks_like_path  # one rule, re-exported
    assert [utils.hub.looks_like_path(t) for t in ("/a", "./a", "~/a", "a/b/c", "a\\b", "a/b", "a")] == [
        True, True, True, True, True, False, False,
    ]


# ------------------------------------------------------------------ the reader itself


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


@pytest.mark.parametrize(
    ("files", "cycle"),
    [
        # a function-level import closes the circle
        (
            {"a.py": "from .b import x\n", "b.py": "def f():\n    from .a import y\n"},
            ["rewards.a", "rewards.b", "rewards.a"],
        ),
        # `from . import c`, and a lazy "rewards.module:Class" string
        (
            {"a.py": "from . import c\n", "c.py": "TABLE = {'x': 'rewards.a:Thing'}\n"},
            ["rewards.a", "rewards.c", "rewards.a"],
        ),
        ({"a.py": "from .b import x\n", "b.py": "import torch\n"}, None),
    ],
)
def test_reader_finds_cycles(tmp_path, files, cycle):
    assert find_cycle(import_graph(_write(tmp_path / "rewards", files))) == cycle


def test_reader_finds_upward_imports_inside_functions(tmp_path):
    files = {
        "a.py": "def f():\n    from utils.hub import looks_like_path\n",
        "b.py": "import benchmarks.tradeoff\nimport utilsx\n",
    }
    graph = import_graph(_write(tmp_path / "rewards", files))
    assert upward_imports(graph) == ["rewards.a -> utils.hub", "rewards.b -> benchmarks.tradeoff"]
