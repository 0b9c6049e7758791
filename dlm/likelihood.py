"""The likelihood of a validation set under a family (``python -m dlm.evaluate``'s first part): the family's
``nll_bound`` in nats per token (exact for a family with ``exact_nll``, e.g. AR), averaged over K Monte-Carlo draws
with fixed seeds, with the Monte-Carlo standard error (spread of the K whole-set estimates / sqrt K) and the data
standard error (spread over sequences). A family without a tractable bound (SUNDAE) raises; the result is then
null with the reason."""

from __future__ import annotations

import math
from typing import Any

import torch

from dlm.progress import Bar

MC_SEED_STRIDE = 1000  # draw k, batch b: seed + MC_SEED_STRIDE * k + b


@torch.no_grad()
def likelihood(module, loader, num_mc: int = 8, seed: int = 0, max_batches: int | None = None,
               progress: bool = True) -> dict[str, Any]:
    """The per-token NLL bound over `loader`, averaged over num_mc Monte-Carlo draws.

    Draw k evaluates every batch b with `torch.Generator().manual_seed(seed + 1000 * k + b)`: fixed, so two
    evaluations of one checkpoint agree exactly, and independent across draws, so their spread gives the
    Monte-Carlo standard error. Families with `exact_nll = True` are evaluated once (K = 1, stderr 0).
    Returns plain numbers; `nll_bound` is None with `error` set when the family has no bound. ``progress``: a bar
    over the draws' batches (dlm.progress: on a terminal only).
    """
    if int(num_mc) < 1 or (max_batches is not None and int(max_batches) < 1):
        raise ValueError(f"num_mc={num_mc} and max_batches={max_batches} must be >= 1 (max_batches: or None, all)")
    exact = module.exact_nll
    draws = 1 if exact else int(num_mc)
    try:
        batches = len(loader)
    except TypeError:  # an iterable without a length: a bar without a total
        batches = None
    if batches is not None and max_batches is not None:
        batches = min(batches, max(int(max_batches), 0))
    with Bar(draws * batches if batches is not None else None, "likelihood", enabled=progress) as bar:
        return _likelihood(module, loader, exact, draws, seed, max_batches, bar)


def _likelihood(module, loader, exact: bool, draws: int, seed: int, max_batches: int | None, bar) -> dict[str, Any]:
    device = module.compute_device
    totals: list[float] = []  # per draw: summed NLL over all counted tokens
    per_seq: torch.Tensor | None = None  # summed over draws, per sequence
    seq_tokens: list[torch.Tensor] = []
    num_tokens = 0
    for k in range(draws):
        total = 0.0
        seq_sums = []
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            batch = {key: v.to(device) for key, v in batch.items()}
            generator = torch.Generator(device=device).manual_seed(seed + MC_SEED_STRIDE * k + b)
            torch.manual_seed(seed + MC_SEED_STRIDE * k + b)  # for a family that draws from the global RNG
            try:
                nll = module.nll_bound(batch, generator=generator)
            except Exception as err:  # noqa: BLE001 - a family without a bound says so by raising
                if k == 0 and b == 0:
                    return {"nll_bound": None, "ppl_bound": None, "nll_bound_error": f"{type(err).__name__}: {err}",
                            "nll_bound_exact": exact}
                raise
            nll = nll.float() * batch["loss_mask"].float()
            seq_sums.append(nll.sum(1).cpu())
            total += float(nll.sum())
            if k == 0:
                seq_tokens.append(batch["loss_mask"].sum(1).cpu())
                num_tokens += int(batch["loss_mask"].sum())
            bar.advance()
        totals.append(total)
        sums = torch.cat(seq_sums)
        per_seq = sums if per_seq is None else per_seq + sums
    if num_tokens == 0:
        raise ValueError("no validation tokens to evaluate (empty validation split or max_batches=0)")
    estimates = torch.tensor(totals, dtype=torch.float64) / num_tokens
    nll = float(estimates.mean())
    mc_stderr = float(estimates.std(unbiased=True) / math.sqrt(draws)) if draws > 1 else 0.0
    # Data standard error: per-sequence NLL per token (averaged over draws), ratio estimator's linearisation.
    tokens = torch.cat(seq_tokens).double()
    seq_nll = per_seq.double() / draws
    resid = seq_nll - nll * tokens
    n = tokens.numel()
    data_stderr = float(resid.std(unbiased=True) * math.sqrt(n) / tokens.sum()) if n > 1 else 0.0
    return {
        "nll_bound": nll,
        "ppl_bound": math.exp(nll),
        "nll_bound_stderr": mc_stderr,
        "nll_bound_stderr_data": data_stderr,
        "nll_bound_num_mc": draws,
        "nll_bound_exact": exact,
        "nll_bound_tokens": num_tokens,
        "nll_bound_sequences": n,
    }
