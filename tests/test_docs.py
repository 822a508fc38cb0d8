"""Committed documents speak to any reader: no absolute path of the machine that wrote
them (reports record the data folder's name, not where it lay)."""

from __future__ import annotations

import re

from hahnet.eval.runner import shown_path

from conftest import REPO, committed_files

# an absolute path into a home, scratch or mount folder; not part of a URL or a relative path
ABSOLUTE = re.compile(r"(?<![\w.~-])/(?:work|root|home|tmp|Users|mnt|scratch|var/folders)/")


def test_no_committed_doc_or_report_holds_an_absolute_path():
    files = committed_files("docs/*.md", "docs/*.json", "*.md")
    assert any(f.name == "results.json" for f in files)  # the reports are scanned too
    found = [f"{f.relative_to(REPO)}:{n}: {line.strip()[:100]}"
             for f in files
             for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
             if ABSOLUTE.search(line)]
    assert not found, "absolute paths in committed docs:\n" + "\n".join(found)


def test_the_pattern_finds_machine_paths_and_spares_others():
    for bad in ("Data: `/work/shared/data/x`", '"path": "/tmp/pytest-1/data"', "see /home/me/x",
                "cd /root/x"):
        assert ABSOLUTE.search(bad), bad
    for fine in ("../shared/data/cifar10-jpeg", "https://example.org/home/x", "~/.cache/hahnet",
                 "runs/tmp/x", "docs/results/cpu"):
        assert not ABSOLUTE.search(fine), fine


def test_reports_record_a_data_folder_by_name_when_given_absolute(tmp_path):
    assert shown_path(tmp_path / "cifar10-jpeg") == "cifar10-jpeg"
    assert shown_path("../shared/data/cifar10-jpeg") == "../shared/data/cifar10-jpeg"
