"""tests.peers: a missing tool or module skips locally and fails in CI (CI=true), and no test
module skips on its own without asking whether it runs in CI (review L13)."""

from __future__ import annotations

import re

import pytest

from tests import peers


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


def test_no_test_skips_silently_in_ci() -> None:
    """A direct pytest.skip/importorskip must sit in a module that checks IN_CI itself; a
    skipif must say it is opt-in."""
    offenders = []
    for path in sorted((peers.ROOT / "tests").rglob("*.py")):
        if path.name == "peers.py":
            continue
        text = path.read_text()
        direct = re.search(r"pytest\.(skip|importorskip)\(", text)
        if direct and "IN_CI" not in text:
            offenders.append(f"{path.relative_to(peers.ROOT)}: {direct.group(0)}")
        for reason in re.findall(r"skipif\((?:[^()]|\([^()]*\))*?reason=([^)]*)\)", text, re.S):
            if "opt-in" not in reason:
                offenders.append(f"{path.relative_to(peers.ROOT)}: skipif without opt-in")
    assert offenders == []
