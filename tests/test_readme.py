"""The README's library example runs as written."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_library_example_runs(capsys):
    blocks = python_blocks(README.read_text())
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert "HaH scores per layer" in capsys.readouterr().out
    assert len(namespace["objective"].scores) == 6
