"""Rules of the code base that a reader can check by eye, checked on every file instead."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").exists())


def sources(pkg: Path):
    for f in sorted(pkg.rglob("*.py")):
        yield f, ast.parse(f.read_text(), str(f))


def test_no_plugin_imports_another_plugin():
    """What two plugins share lives in agent/."""
    bad = []
    for pkg in PLUGINS:
        for f, tree in sources(pkg):
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    parts = n.split(".")
                    if parts[0] == "plugins" and len(parts) > 1 and parts[1] != pkg.name:
                        bad.append(f"{f.relative_to(ROOT)}:{node.lineno} imports {n}")
    assert not bad, bad


def test_no_plugin_blocks_in_asyncios_default_executor():
    """Every blocking call of a plugin goes through its own bounded pool with a timeout
    (Runner.call): asyncio.to_thread and run_in_executor(None, ...) use asyncio's shared,
    unbounded-in-time default pool, where one hung call waits forever and holds a thread
    every plugin shares."""
    bad = []
    for pkg in PLUGINS:
        for f, tree in sources(pkg):
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                    continue
                name = node.func.attr
                default_pool = (name == "run_in_executor" and node.args
                                and isinstance(node.args[0], ast.Constant) and node.args[0].value is None)
                if name == "to_thread" or default_pool:
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno} {name}")
    assert not bad, bad
