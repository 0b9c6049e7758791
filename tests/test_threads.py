"""dlm.threads: the intra-op thread count (config key > OMP_NUM_THREADS > the free cores) and its one line."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from dlm.config import ConfigError
from dlm.threads import SMALL_HOST, apply_threads, choose_threads


def test_the_config_key_wins_over_omp_num_threads_and_the_rule():
    assert choose_threads(3, "2", cores=2, load=5.0, cpu_run=True)[0] == 3


def test_omp_num_threads_wins_over_the_rule():
    n, reason = choose_threads(None, "2", cores=2, load=5.0, cpu_run=True)
    assert n == 2 and "OMP_NUM_THREADS" in reason


@pytest.mark.parametrize(("load", "expected"), [(0.0, 2), (0.4, 2), (1.0, 1), (4.8, 1)])
def test_the_rule_uses_the_free_cores_of_a_small_host(load, expected):
    n, reason = choose_threads(None, None, cores=2, load=load, cpu_run=True)
    assert n == expected and "2 cores" in reason and f"{load:.1f}" in reason


def test_the_rule_leaves_large_hosts_and_accelerator_runs_to_torch():
    assert choose_threads(None, None, cores=SMALL_HOST + 1, load=0.0, cpu_run=True)[0] is None
    assert choose_threads(None, None, cores=2, load=0.0, cpu_run=False)[0] is None
    assert choose_threads(None, "", cores=2, load=0.0, cpu_run=True)[0] == 2  # an empty variable is unset


@pytest.mark.parametrize("bad", [0, -1, True, "two"])
def test_a_bad_config_key_names_the_field(bad):
    with pytest.raises(ConfigError, match="threads must be an integer >= 1"):
        choose_threads(bad, None, cores=2, load=0.0, cpu_run=True)


def test_a_bad_omp_num_threads_names_the_variable():
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS"):
        choose_threads(None, "x", cores=2, load=0.0, cpu_run=True)


def test_apply_threads_sets_torch_and_says_so_in_one_line(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    try:
        assert apply_threads(OmegaConf.create({"threads": 1, "trainer": {"accelerator": "cpu"}})) == 1
        assert torch.get_num_threads() == 1
        assert apply_threads(OmegaConf.create({"threads": None, "trainer": {"accelerator": "cpu"}})) == 2
    finally:
        torch.set_num_threads(before)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["threads: 1 (the config key threads)", "threads: 2 (OMP_NUM_THREADS)"]
