"""docs/methods.md lists every registered method and every knob with its registry default.

The knob tables there are written from ``fss methods --json``; this keeps them from going
stale when a knob is added, renamed or given another default.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fss.models import get_method, list_methods

DOC = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def _sections() -> dict[str, str]:
    parts = re.split(r"^### (\w+).*$", DOC.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("method", list_methods())
def test_every_knob_is_documented_with_its_default(method):
    section = _sections().get(method)
    assert section is not None, f"docs/methods.md has no '### {method}' section"
    rows = dict(re.findall(r"^\| `(\w+)` \| `(.+?)` \|", section, flags=re.M))
    inherited = re.search(r"^Knobs of \w+ with the same defaults: (.*)$", section, flags=re.M)
    inherited_names = set(re.findall(r"`(\w+)`", inherited.group(1))) if inherited else set()
    spec = get_method(method)
    base = get_method(spec.base) if spec.base else None
    for name, knob in spec.knobs.items():
        if name in inherited_names:
            assert base is not None and base.knobs[name].default == knob.default, (method, name)
            continue
        assert name in rows, f"docs/methods.md: knob '{name}' of '{method}' is missing"
        assert rows[name] == repr(knob.default), (method, name, rows[name])
    assert set(rows) <= set(spec.knobs), f"docs/methods.md documents knobs '{method}' lacks"
