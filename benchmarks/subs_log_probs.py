"""SUBS log-probabilities for sampling (dlm.methods.masked_terms.subs_log_probs) against the plain out-of-place
formula, in the same process: the per-step cost every masked-diffusion sampler pays after the forward.

    python benchmarks/subs_log_probs.py [--batch 4 --length 320 --vocab 32768 --repeats 5]

At a large vocabulary the [B, T, V] float32 tensors dominate: the plain formula allocates five of them per step
(the float copy, the masked fill, the log-softmax, the one-hot copy, the select); subs_log_probs allocates one
and works in place. Prints both times, the ratio and the largest difference (float rounding only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlm.methods.masked_terms import subs_log_probs  # noqa: E402


def plain_subs(logits: torch.Tensor, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The baseline: the SUBS formula written out of place."""
    never = torch.arange(logits.shape[-1], device=logits.device) == mask_id
    logp = logits.float().masked_fill(never, float("-inf")).log_softmax(-1)
    copied = torch.full_like(logp, float("-inf")).scatter_(-1, xt[..., None], 0.0)
    return torch.where((xt != mask_id)[..., None], copied, logp)


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=320)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    mask_id = args.vocab - 1
    logits = torch.randn(args.batch, args.length, args.vocab, generator=g)
    xt = torch.randint(0, mask_id, (args.batch, args.length), generator=g)
    xt[:, args.length // 5:] = mask_id  # a prompt, then masks
    ref, new = plain_subs(logits, xt, mask_id), subs_log_probs(logits, xt, mask_id, args.vocab)
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(new)), "the two disagree on which entries are impossible"
    diff = (ref - new)[finite].abs().max().item()
    plain_ms = best_ms(lambda: plain_subs(logits, xt, mask_id), args.repeats)
    ours_ms = best_ms(lambda: subs_log_probs(logits, xt, mask_id, args.vocab), args.repeats)
    print(f"B={args.batch} T={args.length} V={args.vocab} threads={args.threads}: plain {plain_ms:.1f} ms, "
          f"subs_log_probs {ours_ms:.1f} ms, speed-up {plain_ms / ours_ms:.2f}x, max |diff| {diff:.2e}")
    return {"plain_ms": plain_ms, "subs_ms": ours_ms, "max_abs_diff": diff}


if __name__ == "__main__":
    main()
