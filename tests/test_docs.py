"""Meta-tests: every hook documented with its exact signature, and tested; docs and snippets exist."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from mjfilter import hookspecs

ROOT = Path(__file__).parent.parent
HOOKS = sorted(n for n, f in vars(hookspecs).items() if n.startswith("mjfilter_") and callable(f))


def signature(name: str) -> str:
    fn = getattr(hookspecs, name)
    sig = inspect.signature(fn)
    params = ", ".join(
        p.name + (f": {p.annotation}" if p.annotation is not inspect.Parameter.empty else "")
        for p in sig.parameters.values()
    )
    ret = f" -> {sig.return_annotation}" if sig.return_annotation is not inspect.Signature.empty else ""
    return f"def {name}({params}){ret}".replace("'", "").replace('"', "")


def test_there_are_hooks():
    assert len(HOOKS) >= 6


def test_every_hook_is_documented_with_its_exact_signature():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    for name in HOOKS:
        assert f"### `{name}`" in doc, f"docs/plugins.md has no section for {name}"
        assert signature(name) in doc, f"docs/plugins.md does not show the exact signature:\n{signature(name)}"


def test_every_documented_hook_exists():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    for name in re.findall(r"^### `(mjfilter_\w+)`", doc, re.M):
        assert name in HOOKS, f"docs/plugins.md documents {name}, which is not a hook"


def test_every_hook_has_a_test():
    tree = ast.parse((ROOT / "tests" / "test_hooks.py").read_text())
    tests = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    for name in HOOKS:
        assert f"test_hook_{name}" in tests, f"tests/test_hooks.py has no test_hook_{name}"


def test_every_hook_has_a_docstring_with_params():
    for name in HOOKS:
        fn = getattr(hookspecs, name)
        doc = inspect.getdoc(fn) or ""
        assert doc, name
        for p in inspect.signature(fn).parameters:
            assert f":param {p}:" in doc, f"{name}: :param {p}: missing"


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().split("\n## ", 2)
    text = "\n".join(head[:2])
    assert "make run" in text and "make test" in text


def test_ci_runs_make_test_only():
    lines = [x for x in (ROOT / ".ci" / "run").read_text().splitlines() if x and not x.startswith("#")]
    assert lines[-1] == "make test"
