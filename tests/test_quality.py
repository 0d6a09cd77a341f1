"""Lint (ruff), type check (mypy on the core and the training layer) and function length as tests, so CI
fails on a finding."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(), reason="ruff not installed")
def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    out = subprocess.run([ruff, "check", "rso_ray", "tests", "benchmarks", "tools", "clusters"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_is_clean_on_the_core() -> None:
    pytest.importorskip("mypy")
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [line for b in blocks for line in b.splitlines() if line.strip().endswith("python -m pytest")]
    assert commands, "README.md gives no test command"
    assert commands[0].strip() in [line.strip() for line in ci.splitlines()]


MAX_FUNCTION_LINES = 60  # a function reads at once (the project's style guide)


def long_functions(paths: list[Path]) -> list[str]:
    """'file:line name (n lines)' of every function longer than MAX_FUNCTION_LINES."""
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_of_the_package_is_over_60_lines(tmp_path: Path) -> None:
    assert not long_functions(sorted((ROOT / "rso_ray").rglob("*.py")))
    long = tmp_path / "long.py"  # the check itself finds a function of 61 lines, not one of 60
    long.write_text("def f():\n" + "    x = 1\n" * 60 + "\n\ndef g():\n" + "    x = 1\n" * 59)
    assert long_functions([long]) == ["long.py:1 f (61 lines)"]


def test_every_relative_link_of_the_docs_resolves() -> None:
    """README.md and docs/*.md link to files that exist (a moved file breaks no link silently)."""
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
