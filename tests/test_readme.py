"""The README's library example runs as written (offline, on the embedded MiniLM)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def library_example() -> str:
    text = README.read_text()
    section = text[text.index("## The library") :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_library_example_runs_offline(capsys):
    code = library_example()
    assert "minilm_path()" in code and "load_peft" in code and "input_ids" in code
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert "(2, 7, 384)" in capsys.readouterr().out
