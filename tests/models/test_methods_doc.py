"""docs/methods.md's knob tables are the output of `fss methods --markdown`, not hand-kept prose.

The block between the generator's markers must equal what the registry gives today; when a
knob is added, renamed or given another default (or a method is added), rerun
`uv run fss methods --markdown --write docs/methods.md`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fss.errors import ConfigError
from fss.models import get_method, list_methods
from pipeline.models_cmd import BEGIN, END, methods_markdown, with_generated_block

DOC = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def test_the_knob_tables_of_docs_methods_md_are_the_generators_output():
    text = DOC.read_text()
    assert with_generated_block(text, methods_markdown(), DOC) == text, (
        "docs/methods.md's generated knob tables are stale: run "
        "'uv run fss methods --markdown --write docs/methods.md'")


def test_the_generated_block_names_every_method_and_knob_default():
    block = methods_markdown()
    assert block.startswith(BEGIN) and block.rstrip().endswith(END)
    for method in list_methods():
        spec = get_method(method)
        heading = f"### {method}" + (f" (base: {spec.base})" if spec.base else "")
        assert f"\n{heading}\n" in block, heading
        section = block.split(f"\n{heading}\n", 1)[1].split("\n### ", 1)[0]
        base = get_method(spec.base) if spec.base else None
        shared_line = next((line for line in section.splitlines() if line.startswith("Knobs of ")), "")
        for name, knob in spec.knobs.items():
            if base is not None and base.knobs.get(name) == knob:  # same definition as the base: named once
                assert f"`{name}`" in shared_line, (method, name)
            else:
                assert f"| `{name}` | `{knob.default!r}` |" in section, (method, name)
        assert f"Results-table row: {spec.display}." in section


def test_writing_replaces_only_the_block_and_refuses_a_file_without_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"# prose before\n\n{BEGIN}\nstale table\n{END}\n\nprose after\n")
    rewritten = with_generated_block(doc.read_text(), methods_markdown(), doc)
    assert rewritten.startswith("# prose before\n\n") and rewritten.endswith(f"{END}\n\nprose after\n")
    assert "stale table" not in rewritten and with_generated_block(rewritten, methods_markdown(), doc) == rewritten
    with pytest.raises(ConfigError, match="needs one line"):
        with_generated_block("# no markers\n", methods_markdown(), doc)
