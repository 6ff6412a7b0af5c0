"""The chapters' shared setup: the seed from ANNSNN_SEED, one CPU thread, a run folder per seed."""
from pathlib import Path

import pytest
import torch

import annsnn.chapter
import annsnn.pipeline


def test_the_seed_comes_from_annsnn_seed_and_defaults_to_zero(monkeypatch):
    monkeypatch.delenv("ANNSNN_SEED", raising=False)
    assert annsnn.chapter.seed_from_env() == 0
    monkeypatch.setenv("ANNSNN_SEED", " 3 ")
    assert annsnn.chapter.seed_from_env() == 3


@pytest.mark.parametrize("text", ["three", "1.5", "-1"])
def test_a_seed_that_is_not_a_whole_number_is_refused_with_a_message_that_names_it(monkeypatch, text):
    monkeypatch.setenv("ANNSNN_SEED", text)
    with pytest.raises(ValueError, match="ANNSNN_SEED"):
        annsnn.chapter.seed_from_env()


def test_setup_seeds_torch_sets_one_thread_and_prints_the_seed(monkeypatch, capsys):
    monkeypatch.setenv("ANNSNN_SEED", "2")
    monkeypatch.setenv("ANNSNN_PROFILE", "quick")
    threads = torch.get_num_threads()
    try:
        profile, device, seed = annsnn.chapter.setup()
        first = torch.rand(3)
        annsnn.chapter.setup(verbose=False)
        assert torch.equal(first, torch.rand(3))   # seeded again: the same numbers
        assert (profile, seed) == ("quick", 2)
        if device.type == "cpu":
            assert torch.get_num_threads() == annsnn.chapter.CPU_THREADS
        assert "seed 2 (ANNSNN_SEED)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


def test_each_seed_has_its_own_run_folder():
    assert annsnn.chapter.run_dir("quick", 0) == Path("runs/quick")
    assert annsnn.chapter.run_dir("quick", 3) == Path("runs/quick-seed3")


class _Stop(Exception):
    pass


def _stop(*args, **kwargs):
    raise _Stop


def test_prepare_seeds_both_stages(monkeypatch):
    seen = {}
    monkeypatch.setattr(annsnn.pipeline, "load_dataset", _stop)   # stop once the settings are made
    monkeypatch.setattr(annsnn.pipeline, "get_profile",
                        lambda name, **kw: seen.update(kw) or annsnn.pipeline.PROFILES[name])
    with pytest.raises(_Stop):
        annsnn.pipeline.prepare("quick", out_dir="unused", seed=4, settings={"stage1": {"epochs": 2}})
    assert seen["stage1"] == {"epochs": 2, "seed": 4} and seen["stage2"] == {"seed": 4}
