"""The self-check helper tells a written answer from a borrowed one, and leaves the package as it was."""
import pytest
import torch

import annsnn
from annsnn import theory
from annsnn.exercises import library_calls


def _through_module(x):
    return theory.omega(x)


def _through_package(x):
    return annsnn.omega(x)


def _imported(x):
    from annsnn.theory import omega
    return omega(x)


def _written(x):
    omega = x.sum() / x.square().sum()  # a variable named like the function is not a use
    return omega


@pytest.mark.parametrize("fn", [_through_module, _through_package, _imported], ids=lambda f: f.__name__)
def test_a_borrowed_answer_is_seen(fn):
    x = torch.rand(8, dtype=torch.float64)
    result, used = library_calls(fn, x, modules=(theory,))
    assert "annsnn.theory.omega" in used
    assert torch.equal(result, theory.omega(x))


def test_a_written_answer_uses_nothing_and_the_package_is_restored():
    original = theory.omega
    x = torch.rand(8, dtype=torch.float64)
    result, used = library_calls(_written, x, modules=(theory,))
    assert used == [] and torch.allclose(result, original(x))
    assert theory.omega is original and annsnn.omega is original


def test_the_package_is_restored_when_the_answer_raises():
    original = theory.if_trace

    def broken(x):
        theory.if_trace(x)
        raise RuntimeError("a bug in the answer")

    with pytest.raises(RuntimeError, match="a bug"):
        library_calls(broken, torch.ones(3, 2), modules=(theory,))
    assert theory.if_trace is original


from annsnn.theory import omega as imported_at_the_top  # noqa: E402  (as a notebook's first cell would)


def _bare_name(x):
    return imported_at_the_top(x)


def test_a_function_imported_where_the_answer_was_written_is_seen_and_restored():
    result, used = library_calls(_bare_name, torch.rand(8, dtype=torch.float64), modules=(theory,))
    assert "annsnn.theory.omega" in used
    assert globals()["imported_at_the_top"] is theory.omega
