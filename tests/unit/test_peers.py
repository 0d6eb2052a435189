"""tests.peers: a missing tool or module skips locally and fails in CI (CI=true); and under
CI=true no test skips or xfails, however it asks to, unless it is allow-listed (tests/ci_guard.py,
registered by tests/conftest.py)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from tests import peers
from tests.ci_guard import ALLOWED, CIGuard


@pytest.mark.parametrize("in_ci", [False, True])
def test_missing_skips_locally_and_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, in_ci: bool
) -> None:
    monkeypatch.setattr(peers, "IN_CI", in_ci)
    expected = pytest.fail.Exception if in_ci else pytest.skip.Exception
    with pytest.raises(expected, match="frob is not installed: apt-get install frob"):
        peers.missing("frob", "apt-get install frob")
    with pytest.raises(expected, match="Python module no_such_module_here is not installed"):
        peers.need_module("no_such_module_here", "pip install it")
    assert peers.need_module("json", "-").dumps([1]) == "[1]"


# Every way a test can avoid running, one test each.
EVASIONS = """
import pytest

@pytest.mark.skip(reason="marker")
def test_marker(): pass

@pytest.mark.skipif(True, reason="condition")
def test_skipif(): pass

@pytest.mark.xfail(reason="expected")
def test_xfail(): assert False

@pytest.mark.xfail(reason="passes anyway")
def test_xpass(): pass

def test_raise_exception(): raise pytest.skip.Exception("raised")

def test_call(): pytest.skip("called")

def test_importorskip(): pytest.importorskip("no_such_module_here")

def test_call_xfail(): pytest.xfail("called")

@pytest.fixture
def tool(): pytest.skip("fixture")

def test_fixture(tool): pass

@pytest.mark.skip(reason="opt-in")
def test_allowed(): pass

def test_runs(): assert True
"""
MODULE_SKIP = 'import pytest\npytest.skip("whole module", allow_module_level=True)\n'
ARGS = ("-p", "no:cacheprovider", "--continue-on-collection-errors")


def make_tree(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_evasions=EVASIONS, test_module_skip=MODULE_SKIP)


def test_every_skip_and_xfail_fails_under_the_guard(pytester: pytest.Pytester) -> None:
    make_tree(pytester)
    guard = CIGuard({"test_evasions.py::test_allowed": "opt-in"})
    result = pytester.runpytest_inprocess(*ARGS, plugins=[guard])
    # A skip in setup (markers, fixtures) or collection is an error, in the call a failure.
    result.assert_outcomes(passed=1, skipped=1, failed=6, errors=4)
    out = result.stdout.str()
    for reason in ("marker", "condition", "expected", "raised", "called", "fixture"):
        assert f"Skipped: {reason})" in out or f"xfail: {reason}" in out, reason
    assert "module skipped at collection" in out and "xpassed" in out


def test_without_the_guard_the_same_tests_skip(pytester: pytest.Pytester) -> None:
    """The control: pytest alone lets all of them through, which is what the guard is for."""
    make_tree(pytester)
    result = pytester.runpytest_inprocess(*ARGS)
    result.assert_outcomes(passed=1, skipped=8, xfailed=2, xpassed=1)


def test_the_guard_is_on_when_ci_is_true() -> None:
    """tests/conftest.py registers the guard from CI alone: a skipping test in the real tree
    (this file's own helper below) fails with CI=true and skips without it."""
    node = f"{__file__}::test_helper_that_skips"
    env = {**os.environ, "NBDGW_GUARD_PROBE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node]
    for ci, code in (("true", 1), ("", 0)):
        proc = subprocess.run(
            cmd, env={**env, "CI": ci}, capture_output=True, text=True, cwd=peers.ROOT, timeout=120
        )
        assert proc.returncode == code, proc.stdout + proc.stderr


def test_helper_that_skips() -> None:
    if os.environ.get("NBDGW_GUARD_PROBE") != "1":
        return  # only the subprocess of the test above runs it for real
    pytest.skip("probe")


def test_allow_list_names_real_opt_in_tests() -> None:
    for nodeid, why in ALLOWED.items():
        path, _, name = nodeid.partition("::")
        assert f"def {name}(" in (peers.ROOT / path).read_text(), nodeid
        assert why.startswith("opt-in"), why


def test_ci_run_exports_ci_itself() -> None:
    """.ci/run sets CI=true, so the guard does not depend on the runner setting it."""
    text = (peers.ROOT / ".ci" / "run").read_text()
    assert "export CI=true" in text
    assert text.index("export CI=true") < text.index("scripts/test")


# --- what no runtime hook can see: a test that returns early when something is missing ----------

PROBES = frozenset({"which", "find_spec", "exists", "is_dir", "is_file", "access", "libc_ver"})
MISSING = frozenset({"ImportError", "ModuleNotFoundError", "FileNotFoundError", "OSError"})


def _returns_nothing(body: list[ast.stmt]) -> bool:
    return (
        len(body) == 1
        and isinstance(body[0], ast.Return)
        and (body[0].value is None or ast.unparse(body[0].value) == "None")
    )


def _called(node: ast.AST) -> set[str]:
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            names.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return names


def early_returns(source: str) -> list[int]:
    """Lines where a function returns, doing nothing, because a tool, module or file is
    missing: ``if shutil.which(...) is None: return``, ``except ImportError: return``."""
    lines = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.If) and _returns_nothing(n.body) and _called(n.test) & PROBES:
            lines.append(n.lineno)
        if isinstance(n, ast.ExceptHandler) and _returns_nothing(n.body) and n.type is not None:
            caught = {getattr(t, "id", "") for t in ast.walk(n.type)}
            if caught & MISSING:
                lines.append(n.lineno)
    return lines


def test_early_return_detector_sees_each_form() -> None:
    assert early_returns("def test_a():\n    if shutil.which('x') is None:\n        return\n")
    assert early_returns("def test_a():\n    if not Path('x').exists():\n        return None\n")
    assert early_returns(
        "def t():\n    try:\n        import x\n    except ImportError:\n        return\n"
    )
    assert early_returns("def t():\n    if not os.access(p, os.X_OK): return\n")
    assert not early_returns("def t():\n    if shutil.which('x') is None:\n        missing('x')\n")


def test_no_test_returns_early_when_something_is_missing() -> None:
    """A test that returns when its tool is missing passes without testing anything; it must
    ask through tests.peers (skip locally, fail in CI) instead."""
    offenders = []
    for path in sorted((peers.ROOT / "tests").rglob("*.py")):
        for line in early_returns(path.read_text()):
            offenders.append(f"{path.relative_to(peers.ROOT)}:{line}")
    assert offenders == []
