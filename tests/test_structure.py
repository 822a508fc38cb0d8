"""tools/check_structure.py holds the package to its layers: the package passes, and a
planted import of a higher layer (top-level, lazy, ``from pkg import module``,
relative), a module in no layer, an import cycle and a chain deeper than the limit each
fail, the first ones naming the file, line and module of the offending import; and
docs/architecture.md draws the same order."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_checker():
    spec = importlib.util.spec_from_file_location("check_structure",
                                                  ROOT / "tools" / "check_structure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = load_checker()


@pytest.fixture
def package(tmp_path) -> Path:
    """A copy of the package to plant faults in."""
    shutil.copytree(ROOT / "src" / "hahnet", tmp_path / "hahnet",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "hahnet"


def plant(path: Path, code: str) -> int:
    """Append ``code`` to ``path``; returns the line of its last line."""
    text = path.read_text() + "\n" + code
    path.write_text(text)
    return len(text.splitlines())


def test_the_package_passes(capsys):
    assert check.main(ROOT / "src" / "hahnet") == 0
    out = capsys.readouterr().out
    assert out.startswith("ok:") and "none importing a higher layer" in out
    depth = int(out.split("import depth ")[1].split()[0])
    assert 1 <= depth <= check.MAX_DEPTH == 9


@pytest.mark.parametrize("file, code, target", [
    ("nn/models.py", "from hahnet.training.checkpoint import load\n",
     "hahnet.training.checkpoint"),
    ("config.py", "def _stats(dataset):\n    from hahnet.data.datasets import channel_stats\n",
     "hahnet.data.datasets"),
    ("eval/metrics.py", "from hahnet.cli import console\n", "hahnet.cli.console"),
    ("reporting/sweep.py", "from ..experiments import sweep\n", "hahnet.experiments.sweep"),
])
def test_a_planted_import_of_a_higher_layer_fails(package, capsys, file, code, target):
    line = plant(package / file, code)
    assert check.main(package) == 1
    out = capsys.readouterr().out
    assert f"{package / file}:{line}: " in out
    message = next(l for l in out.splitlines() if l.startswith(f"{package / file}:{line}: "))
    assert f"imports {target} (" in message and "a higher layer" in message


def test_a_module_in_no_layer_fails(package, capsys):
    (package / "costs.py").write_text('"""A flat module."""\n')
    assert check.main(package) == 1
    assert "hahnet.costs is in no layer" in capsys.readouterr().out


def test_an_import_cycle_fails(package, capsys):
    plant(package / "nn" / "fused.py", "def _late():\n    from hahnet.nn import layers\n")
    assert check.main(package) == 1
    assert "import cycle: hahnet.nn.fused -> hahnet.nn.layers -> hahnet.nn.fused" in \
        capsys.readouterr().out


def test_a_chain_deeper_than_the_limit_fails(package, capsys):
    for i in range(check.MAX_DEPTH + 1):  # nn.chain0 -> chain1 -> ... -> chain10
        (package / "nn" / f"chain{i}.py").write_text(f"from hahnet.nn import chain{i + 1}\n")
    (package / "nn" / f"chain{check.MAX_DEPTH + 1}.py").write_text("")
    assert check.main(package) == 1
    out = capsys.readouterr().out
    assert f"import depth {check.MAX_DEPTH + 1} (> {check.MAX_DEPTH}): hahnet.nn.chain0 ->" in out


def test_the_architecture_picture_shows_the_checked_order():
    """docs/architecture.md draws LAYERS; the two cannot drift apart."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("```mermaid", 1)[1].split("```", 1)[0]
    chain = next(line for line in block.splitlines() if line.count("-->") > 1)
    assert [name.strip() for name in chain.split("-->")] == [name for name, _ in check.LAYERS]
