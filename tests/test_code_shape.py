"""The shape the code promises in docs/architecture.md, checked so that it stays true.

Rooms stay small (modules under 400 lines, functions under 60, nesting at most 4 deep), imports run
one way (no `rft` module reaches into the `rewards` plugins), and the modules that read run
folders import without torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("rft/**/*.py"), *ROOT.glob("rewards/**/*.py"),
                  *ROOT.glob("environments/**/*.py")])
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_NESTING = 4
NESTING_NODES = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match,
                 ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
TORCH_FREE = ["rft.monitors", "rft.report", "rft.stats", "rft.metrics", "rft.reward_loading", "rewards.base",
              "rft.environment"]


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _depth(node: ast.AST) -> int:
    """How many compound statements nest below `node` (its own body counts as level one)."""
    deepest = 0
    for child in ast.iter_child_nodes(node):
        below = _depth(child)
        if isinstance(child, NESTING_NODES) and not _is_elif(node, child):
            below += 1
        deepest = max(deepest, below)
    return deepest


def _is_elif(parent: ast.AST, child: ast.AST) -> bool:
    """`elif` is an `If` inside the `orelse` of an `If`: it reads as one level, as it is written."""
    return isinstance(parent, ast.If) and isinstance(child, ast.If) and parent.orelse == [child]


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


@pytest.mark.parametrize("path", SOURCES, ids=_relative)
def test_module_is_short(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{_relative(path)} has {lines} lines"


@pytest.mark.parametrize("path", SOURCES, ids=_relative)
def test_functions_are_short_and_shallow(path: Path) -> None:
    tree = ast.parse(path.read_text())
    problems = []
    for function in _functions(tree):
        length = function.end_lineno - function.lineno + 1
        if length > MAX_FUNCTION_LINES:
            problems.append(f"{function.name} (line {function.lineno}) has {length} lines")
        depth = max((_depth(statement) + isinstance(statement, NESTING_NODES) for statement in function.body),
                    default=0)
        if depth > MAX_NESTING:
            problems.append(f"{function.name} (line {function.lineno}) nests {depth} deep")
    assert not problems, f"{_relative(path)}: " + "; ".join(problems)


def _imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


# The one door between the trainer and the plugins: it loads rewards by spec and re-exports the
# contract types (`rewards.base`) for the rest of `rft`.
REWARD_BOUNDARY = "rft/reward_loading.py"


@pytest.mark.parametrize("path",
                         [p for p in sorted(ROOT.glob("rft/**/*.py")) if _relative(p) != REWARD_BOUNDARY],
                         ids=_relative)
def test_rft_does_not_import_the_reward_plugins(path: Path) -> None:
    """Plugins depend on `rewards.base`, never the trainer on the plugins (they are loaded by spec)."""
    imported = _imported_modules(ast.parse(path.read_text()))
    plugins = sorted(name for name in imported if name.split(".")[0] in ("rewards", "environments"))
    assert not plugins, f"{_relative(path)} imports {plugins}"


# The one public `rft` module each kind of plugin may import: rewards the helper for the trainer's state,
# environments their contract. Both may use `rewards.*` (environments score answers with reward helpers).
PLUGIN_HELPERS = {"rewards": "rft.reward_context", "environments": "rft.environment"}


PLUGINS = sorted(path for folder in PLUGIN_HELPERS for path in ROOT.glob(f"{folder}/**/*.py"))


@pytest.mark.parametrize("path", PLUGINS, ids=_relative)
def test_plugins_use_only_their_public_helper(path: Path) -> None:
    helper = PLUGIN_HELPERS[path.relative_to(ROOT).parts[0]]
    imported = _imported_modules(ast.parse(path.read_text()))
    internal = sorted(name for name in imported
                      if (name == "rft" or name.startswith("rft.")) and name != helper)
    assert not internal, f"{_relative(path)} imports {internal}"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module: str) -> None:
    """Reading a run folder (report, monitors, statistics) must not pay for, or need, torch."""
    probe = (
        "import sys, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"importlib.import_module({module!r})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
