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


def test_every_readme_example_runs(capsys):
    """The library's other examples (networks, hahify, a layer cost) run as written."""
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    for index, block in enumerate(blocks[1:4], start=2):
        namespace: dict = {}
        exec(compile(block, f"README.md example {index}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "5 HaH scores" in out and "HaHBlock" in out
    assert len(namespace["objective"].values) == 2
