"""MDLM, BD3-LM or DiffusionBERT training step (forward + backward) with the LM head at the masked positions only
vs. full logits.

A model with a large vocabulary relative to its width (default d=128, 2 layers, vocab 32768, B=8, T=256, one CPU
thread), where the head and the [B, T, V] logits are most of the step. Both paths run in the same process,
interleaved, on the same batches and mask draws; prints the median seconds per step and tokens/s of each and the
ratio, and an estimate of the logits-sized activations each path holds (peak RSS on CPU was too noisy to
separate them; on a GPU read torch.cuda.max_memory_allocated).

BD3-LM (``--method bd3lm``) runs the backbone over [x_t ; x_0] (2T positions, 2T + 1 with ``--shift``): the full
path computes the head on all of them, the selected one only where the masked x_t tokens are read from.

DiffusionBERT (``--method diffusionbert``, spindle schedule with T = ``--num-steps``) takes a float32 log-softmax
of the logits: over [B, T, V] on the full path, over the N masked rows on the selected one. With
``--time-conditioning token`` the backbone sees T + 1 positions (the time token leads, never scored).

``--compile MODE`` compiles the backbone first (:mod:`dlm.compile`): the selected path's graph then ends at the
hidden states and the selection and head run eagerly after it (the number of masked rows changes every step).

Usage: python benchmarks/masked_head.py [--method mdlm|bd3lm|diffusionbert] [--block-size 16] [--shift]
       [--num-steps 512] [--time-conditioning none|token|layerwise]
       [--backbone native|qwen3] [--vocab 32768] [--d 128] [--layers 2]
       [--batch 8] [--seq 256] [--steps 10] [--threads 1] [--device cpu] [--compile MODE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(args):
    import torch

    from dlm.methods.bd3lm import BD3LM
    from dlm.methods.diffusionbert import DiffusionBERT
    from dlm.methods.mdlm import MDLM
    from dlm.models import Transformer
    from dlm.schedules import LinearSchedule
    from dlm.spindle import SpindleSchedule

    torch.manual_seed(0)
    max_len = args.seq + 1  # BD3-LM with shift puts the start token at 0 and x_i at i + 1; the time token too
    if args.backbone == "native":
        backbone = Transformer(vocab_size=args.vocab, n_layers=args.layers, d_model=args.d, n_heads=args.d // 32,
                               max_seq_len=max_len, time_conditioning=args.time_conditioning == "layerwise")
    else:
        from dlm.models.hf import HFCausalLM

        backbone = HFCausalLM(config=dict(
            model_type="qwen3", hidden_size=args.d, intermediate_size=3 * args.d, num_hidden_layers=args.layers,
            num_attention_heads=args.d // 32, num_key_value_heads=args.d // 32, head_dim=32, vocab_size=args.vocab,
            max_position_embeddings=max_len, tie_word_embeddings=True,
        ), attn_implementation="sdpa")
    tok = SimpleNamespace(vocab_size=args.vocab, pad_token_id=0, eos_token_id=1, mask_token_id=args.vocab - 1)
    if args.method == "bd3lm":
        model = BD3LM(backbone, tok, LinearSchedule(), block_size=args.block_size, shift_logits=args.shift)
    elif args.method == "diffusionbert":
        model = DiffusionBERT(backbone, tok, SpindleSchedule(0.3), num_steps=args.num_steps,
                              time_conditioning=args.time_conditioning)
        # Zipf-like token counts, so the spindle schedule masks tokens at different rates
        model.set_token_counts((1e6 / torch.arange(1, args.vocab + 1)).long())
    else:
        model = MDLM(backbone, tok, LinearSchedule(), shift_logits=args.shift)
    model = model.to(args.device)
    ids = torch.randint(0, args.vocab - 1, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(args.device), "loss_mask": torch.ones_like(ids, dtype=torch.bool).to(args.device)}
    return model, batch


def step(model, batch, full: bool, seed: int) -> float:
    import torch

    from dlm.methods.bd3lm import BD3LM
    from dlm.methods.diffusionbert import DiffusionBERT
    from dlm.methods.mdlm import MDLM

    # the full-logits path: every position's [B, T, V] logits, the masked rows scored
    if full and isinstance(model, DiffusionBERT):
        model.log_probs = lambda xt, t, at=None, **kw: DiffusionBERT.log_probs(model, xt, t, **kw)[at]
    elif full and isinstance(model, BD3LM):
        model.vectorised_logits = lambda xt, x0, doc_ids=None, at=None: BD3LM.vectorised_logits(model, xt, x0, doc_ids)
    elif full:
        model.logits = lambda xt, at=None, **kw: MDLM.logits(model, xt, **kw)
    model.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if batch["input_ids"].is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    try:
        loss = model.loss(batch, generator=torch.Generator(batch["input_ids"].device).manual_seed(seed))["loss"]
        loss.backward()
        sync()
    finally:
        model.__dict__.pop("logits", None)
        model.__dict__.pop("vectorised_logits", None)
        model.__dict__.pop("log_probs", None)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("mdlm", "bd3lm", "diffusionbert"), default="mdlm")
    p.add_argument("--block-size", type=int, default=16, help="BD3-LM block size L'")
    p.add_argument("--num-steps", type=int, default=512, help="DiffusionBERT's T")
    p.add_argument("--time-conditioning", choices=("none", "token", "layerwise"), default="none",
                   help="DiffusionBERT (layerwise: native backbone only)")
    p.add_argument("--backbone", choices=("native", "qwen3"), default="native")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shift", action="store_true", help="shift_logits=True (A2D; BD3-LM: SDAR style)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", metavar="MODE", help="torch.compile the backbone first (both paths; dlm.compile)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    model, batch = build(args)
    if args.compile:  # the selected path's graph ends at the hidden states; the head runs eagerly after it
        from dlm.compile import compile_backbone

        compile_backbone(model.backbone, args.compile)
    for seed in range(2 if args.compile else 1):  # warm-up (compiled: a second mask count, dynamic shapes settle)
        step(model, batch, True, seed), step(model, batch, False, seed)
    times = {"full": [], "selected": []}
    for i in range(args.steps):
        for name in times:
            times[name].append(step(model, batch, name == "full", i + 1))
    tokens = args.batch * args.seq
    detail = {"bd3lm": f" L'={args.block_size}",
              "diffusionbert": f" num_steps={args.num_steps} time={args.time_conditioning}"}
    method = args.method + detail.get(args.method, "")
    print(f"{method} {args.backbone}: d={args.d} layers={args.layers} vocab={args.vocab} B={args.batch} "
          f"T={args.seq} shift={args.shift} threads={args.threads} device={args.device} steps={args.steps}"
          + (f" compile={args.compile}" if args.compile else ""))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        print(f"  {name:9s} {t * 1e3:8.1f} ms/step  {tokens / t:9.0f} tokens/s")
    print(f"  speedup selected/full (tokens/s) = {med['full'] / med['selected']:.2f}x")
    # Logits-sized tensors per step (float32): full path [B, T, V] logits, their gradient and the masked rows'
    # float copy; selected path the N masked rows and their gradient. N: on average half the positions.
    # BD3-LM's full path also has the backbone's [B, 2T, V] logits and their gradient before the [B, T, V]
    # prediction rows are picked out of them.
    # DiffusionBERT's full path also has the [B, T, V] log-softmax (and T + 1 positions' logits with the time token),
    # the selected one the N rows' log-softmax.
    n = tokens / 2
    full_rows = tokens * 2 + n + (2 * tokens * 2 if args.method == "bd3lm" else 0)
    sel_rows = 2 * n
    if args.method == "diffusionbert":
        lead = args.batch * 2 if args.time_conditioning == "token" else 0
        full_rows, sel_rows = full_rows + tokens + lead, sel_rows + n
    full_mb, sel_mb = full_rows * args.vocab * 4 / 2**20, sel_rows * args.vocab * 4 / 2**20
    print(f"  logits-sized activations (estimate, N = B*T/2): full {full_mb:.0f} MiB, selected {sel_mb:.0f} MiB")


if __name__ == "__main__":
    main()
