"""The guard in conftest.py: a test that leaves torch's thread count (or another
process-wide setting) changed is reported, and the next test runs with it restored.

Run as a pytest session of its own, in a fresh process, with the project's conftest and
a fixed file order, so that "the next test" is the next one whatever the outer order."""

from __future__ import annotations

from conftest import TESTS

LEAKY = '''
import torch

BEFORE = torch.get_num_threads()


def test_a_leaves_threads_changed():
    torch.set_num_threads(1 if BEFORE > 1 else 2)


def test_b_runs_with_the_threads_restored():
    assert torch.get_num_threads() == BEFORE


def test_c_leaves_the_default_dtype_changed():
    torch.set_default_dtype(torch.float64)


def test_d_runs_with_the_default_dtype_restored():
    assert torch.get_default_dtype() == torch.float32
'''


def test_a_leaking_test_fails_and_the_next_one_runs_restored(pytester):
    pytester.makeconftest((TESTS / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(test_leaky=LEAKY)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:random_order",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines([
        "*test_a_leaves_threads_changed left process-wide settings changed*threads*",
        "*test_c_leaves_the_default_dtype_changed left process-wide settings changed*",
    ])
