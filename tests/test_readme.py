"""The README's Python examples, run as written (from a copy of the repository's configs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    section = REPO.joinpath("README.md").read_text(encoding="utf-8").split("## From Python", 1)[1]
    section = section.split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_has_both_python_examples():
    blocks = python_blocks()
    assert len(blocks) == 2 and "pf2lora.run(" in blocks[0] and "pf2lora.register(" in blocks[1]


@pytest.mark.integration
def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    import pf2lora

    try:
        for block in python_blocks():
            exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
        printed = capsys.readouterr().out
        assert "fedprox" in printed and "homlora" in printed  # the table names both rows
        assert (tmp_path / "runs" / "from-python" / "results.json").exists()
        table = (tmp_path / "runs" / "fedprox" / "table.md").read_text()
        assert "| fedprox |" in table and "Against homlora" in table
        assert "fedprox" in pf2lora.methods.names()
    finally:
        pf2lora.methods.unregister("fedprox")
