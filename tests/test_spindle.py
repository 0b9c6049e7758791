"""The spindle schedule: monotone in t per token, frequent tokens masked later, exact ends, and the counts cache."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dlm.spindle import SpindleSchedule, count_tokens, token_counts

COUNTS = torch.tensor([1000, 300, 50, 5, 0, 2000])


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.3, 1 / math.pi])
def test_keep_probability_is_monotone_in_t_for_every_token_with_exact_ends(lam):
    table = SpindleSchedule(lam).alpha_table(COUNTS, num_steps=64)
    assert table.shape == (65, 6)
    assert torch.all(table.diff(dim=0) <= 1e-12), "some token's keep-probability rises with t"
    assert torch.all(table[0] == 1) and torch.all(table[-1] == 0)
    assert torch.all((table >= 0) & (table <= 1))


def test_frequent_tokens_are_masked_later():
    table = SpindleSchedule(0.3).alpha_table(COUNTS, num_steps=32)
    order = torch.argsort(COUNTS, descending=True)  # most frequent first
    mid = table[1:-1]
    # at every interior step, keep-probability is ordered by frequency (most frequent kept longest)
    assert torch.all(mid[:, order].diff(dim=1) <= 1e-12)
    assert torch.all(mid[:, 5] > mid[:, 3])  # strictly, between the most and a rare token


def test_average_masking_rate_over_the_data_is_linear_before_clipping():
    sched = SpindleSchedule(0.2)
    counts = torch.tensor([40, 30, 20, 10])
    table = sched.alpha_table(counts, num_steps=10)
    weights = counts.double() / counts.sum()
    torch.testing.assert_close(table @ weights, 1 - torch.arange(11, dtype=torch.float64) / 10)


def test_lam_zero_is_the_linear_schedule_and_large_lam_is_refused():
    table = SpindleSchedule(0.0).alpha_table(COUNTS, num_steps=8)
    torch.testing.assert_close(table, (1 - torch.arange(9, dtype=torch.float64) / 8)[:, None].expand(9, 6))
    with pytest.raises(ValueError, match="1/pi"):
        SpindleSchedule(0.5)


@pytest.mark.parametrize("method_name", ["alpha", "mask_prob", "elbo_weight"])
def test_per_time_interface_says_spindle_belongs_to_diffusionbert(method_name):
    with pytest.raises(ValueError, match="method=diffusionbert"):
        getattr(SpindleSchedule(), method_name)(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="method=diffusionbert"):
        SpindleSchedule().unmask_prob(torch.tensor(0.5), torch.tensor(0.2))


def test_mdlm_with_spindle_fails_with_a_clear_error():
    from dlm.methods.mdlm import MDLM
    from dlm.models import Transformer

    tok = SimpleNamespace(vocab_size=7, pad_token_id=4, eos_token_id=5, mask_token_id=6)
    model = MDLM(Transformer(vocab_size=7, n_layers=1, d_model=32, n_heads=2, max_seq_len=8), tok, SpindleSchedule())
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "loss_mask": torch.ones(2, 4, dtype=torch.bool)}
    with pytest.raises(ValueError, match="belongs to method=diffusionbert"):
        model.loss(batch)


def test_counts_skip_positions_outside_the_loss_mask():
    ids = np.array([[0, 1, 1, 3], [2, 2, 2, 3]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=bool)
    assert count_tokens(ids, 5, mask).tolist() == [1, 2, 3, 0, 0]


def test_token_counts_are_cached_next_to_the_data_keyed_by_the_cache_key(tmp_path):
    ids = np.array([[0, 1, 1, 3], [2, 2, 2, 3]])
    data = {"input_ids": ids, "loss_mask": np.ones_like(ids, dtype=bool)}
    dm = SimpleNamespace(train_data=data, cache_dir=str(tmp_path), cache_key=lambda split: f"key-{split}-{tmp_path.name}")
    counts = token_counts(dm, 5)
    assert counts.tolist() == [1, 2, 3, 2, 0]
    files = list(tmp_path.glob("*token-counts*.npz"))
    assert len(files) == 1 and files[0].name.startswith(f"key-train-{tmp_path.name}")
    # no cache folder: counted in memory
    dm2 = SimpleNamespace(train_data=data, cache_dir=None, cache_key=lambda split: f"other-{tmp_path.name}")
    assert token_counts(dm2, 5).tolist() == [1, 2, 3, 2, 0]
