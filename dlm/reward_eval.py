"""Task accuracy of a run on a prompt set, scored by a reward: d1's zero-shot evaluation protocol, for any family.

    python -m dlm.evaluate run=<run> prompts=gsm8k reward=gsm8k reward_eval.lengths=[128,256,512] likelihood=false

d1 (Zhao et al. 2025, github.com/dllm-reasoning/d1, its ``eval/`` scripts) evaluates every checkpoint zero-shot on
the test split of each task at generation lengths 128, 256 and 512 (diffusion steps = length / 2, block length 32,
low-confidence remasking) and reports the accuracy of the extracted answer. Here the prompt rows come from a
``prompts=`` source (its ``reward_eval.split`` split: GSM8K's and MATH500's ``val`` is their test split) and are
completed by the run's sampler (or ``sampler=``) at each length; ``reward_eval.steps_per_token`` sets the steps per
length (d1: 0.5). A completion ends at the model's first stop token (EOS or an instruct model's end-of-turn
token), a prompt goes through the model's chat template where it has one (``reward_eval.chat_prompts``), as GRPO's
rollouts do, so a policy is scored on what it was trained to write. Each reward component's mean is reported per
length (``eval/reward/<component>@<length>``: with reward=gsm8k, the answer accuracy) with its standard error, and
every completion with its rewards goes to ``<run>/eval_rewards.jsonl``.

Greedy or not is the sampler's choice (d1's low-confidence sampler is deterministic at temperature 0); the
evaluation's generator is seeded (``seed``), so two evaluations of one checkpoint agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dlm.data.chat import prompt_ids
from dlm.models.capabilities import conventions_of
from dlm.rewards.base import RewardSet
from dlm.sampling.base import cut_at_eos

__all__ = ["reward_evaluation"]


def _batches(rows: list[dict], ids: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Row indices in batches of one prompt length (a generate call takes one prompt length)."""
    by_len: dict[int, list[int]] = {}
    for i, row_ids in enumerate(ids):
        by_len.setdefault(len(row_ids), []).append(i)
    for length in sorted(by_len):
        members = by_len[length]
        for start in range(0, len(members), batch_size):
            yield members[start : start + batch_size]


def _mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


@torch.no_grad()
def reward_evaluation(
    module,
    rows: list[dict[str, Any]],
    reward: RewardSet,
    lengths: Sequence[int],
    *,
    sampler_for_length,
    chat: bool | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress=None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, one record per completion) of ``module`` completing every prompt row at each of ``lengths``.

    ``sampler_for_length(L)`` gives the sampler for completions of length L (the steps may follow L);
    ``chat`` None: the model's own convention (its chat template when it declares one). ``progress``: called with
    the number of completions done after each batch."""
    chat = conventions_of(module.backbone).chat_template if chat is None else bool(chat)
    texts = [str(r.get("prompt", "")) for r in rows]
    ids = [prompt_ids(module.tokenizer, t, chat) for t in texts]
    stops = getattr(module, "stop_ids", None) or (int(module.eos_id),)
    columns = sorted({k for r in rows for k in r} - {"prompt"})
    metrics: dict[str, Any] = {"reward/num_prompts": len(rows), "reward/chat_prompts": bool(chat)}
    records: list[dict[str, Any]] = []
    previous = module.sampler
    try:
        for L in lengths:
            module.sampler = sampler_for_length(int(L))
            generator = torch.Generator(device=module.compute_device).manual_seed(int(seed) + int(L))
            completions = [""] * len(rows)
            calls = 0
            started = time.perf_counter()
            for batch in _batches(rows, ids, batch_size):
                P = len(ids[batch[0]])
                prompt = torch.tensor([ids[i] for i in batch], dtype=torch.long, device=module.compute_device)
                gen = module.generate(prompt if P else None, int(L), num_samples=len(batch), generator=generator)
                calls += int(gen.num_network_calls)
                for i, row in zip(batch, gen.tokens[:, P:].tolist()):
                    completions[i] = module.tokenizer.decode(cut_at_eos(row, stops))
                if progress is not None:
                    progress(len(batch))
            seconds = time.perf_counter() - started
            components = reward.components(completions, texts, **{k: [r.get(k) for r in rows] for k in columns})
            total = reward.total(components)
            for name, values in {**components, "total": total}.items():
                mean, stderr = _mean_and_stderr(values)
                metrics[f"reward/{name}@{L}"] = mean
                metrics[f"reward/{name}_stderr@{L}"] = stderr
            metrics[f"reward/network_calls@{L}"] = calls
            metrics[f"reward/seconds@{L}"] = round(seconds, 3)
            for i, (text, completion) in enumerate(zip(texts, completions)):
                records.append({"prompt": text, "completion": completion, "length": int(L),
                                "rewards": {name: values[i] for name, values in components.items()},
                                "total": total[i], **{k: rows[i].get(k) for k in columns}})
    finally:
        module.sampler = previous
    return metrics, records
