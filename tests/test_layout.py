"""The house rules of docs/layout.md, read off the code: rooms import only downwards and never in a circle, no
module is over 400 lines, and no code outside `utils/families/` names a family's pipeline class."""

import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UTILS = ROOT / "utils"
# docs/layout.md's floors: a room imports only from rooms on lower floors.
FLOORS = {"errors": 0, "hub": 0, "launchers": 0, "prompts": 1, "lora": 2, "rollout": 3, "toys": 4, "families": 5,
          "memory": 6, "evaluation": 6, "run": 7}
MAX_LINES = 400


def _room(path: Path) -> str:
    return path.relative_to(UTILS).parts[0].removesuffix(".py")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Every `utils.*` module this file imports, at module level or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("utils"):
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]  # `from utils.x import module`
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("utils")]
    return found


def _utils_files() -> list[Path]:
    return sorted(p for p in UTILS.rglob("*.py") if "__pycache__" not in p.parts)


def test_rooms_import_only_from_lower_floors():
    upward = []
    for path in _utils_files():
        if path.parent == UTILS and path.name == "__init__.py":
            continue
        for module in _imports(path):
            parts = module.split(".")
            if len(parts) > 1 and parts[1] in FLOORS and FLOORS[parts[1]] > FLOORS[_room(path)]:
                upward.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not upward, upward
    assert {_room(p) for p in _utils_files() if p.parent != UTILS or p.name != "__init__.py"} == set(FLOORS)


def test_no_module_imports_itself_back_through_a_circle():
    modules = {_module(p): p for p in _utils_files()}
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    # A package's __init__ importing its own modules is how a package is built, not a circle through them.
    graph = {name: {m for m in deps if not (path.name == "__init__.py" and m.startswith(name + "."))}
             for (name, deps), path in zip(graph.items(), modules.values(), strict=True)}
    state: dict[str, int] = {}
    circles = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                circles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, circles


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in [*_utils_files(), *sorted((ROOT / "rewards").glob("*.py"))]
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def _code_tokens(path: Path) -> list[str]:
    """The names and string literals of a file's code: comments and docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {(node.body[0].value.lineno, node.body[0].value.col_offset)
                  for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return [t.string for t in tokens if t.type in (tokenize.NAME, tokenize.STRING) and t.start not in docstrings]


def test_no_family_is_named_outside_its_module():
    """The trainer, the rollout, the evaluator, LoRA I/O and the run never name a family's pipeline class: they ask
    the family. The toys' builders (which build those pipelines) and the families themselves may."""
    from utils.families import FAMILIES

    names = {name for family in FAMILIES for name in (family.pipeline_class_name, *family.serves, family.__name__)}
    outside = [ROOT / "train_draftplus.py", *(p for p in _utils_files() if _room(p) not in ("families", "toys"))]
    named = {}
    for path in outside:
        hits = sorted({name for token in _code_tokens(path) for name in names if name in token})
        if hits:
            named[str(path.relative_to(ROOT))] = hits
    assert not named, named

