"""Samples at the end of training: written to samples.jsonl and, when the data has a checkable task (the
embedded arithmetic), scored — unconditional samples, prompted completions and infilled holes."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch

from dlm.end_of_run import line as stage_line
from dlm.progress import Bar
from dlm.sampling.base import cut_at_eos

SAMPLE_SEED = 0


def unigram_entropy(token_lists: list[list[int]]) -> float:
    """Entropy (nats) of the pooled token distribution: low values expose degenerate repetition."""
    counts = Counter(t for tokens in token_lists for t in tokens)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


class WriteSamples(L.Callback):
    def __init__(
        self,
        path: str,
        num_unconditional: int = 16,
        num_prompted: int = 32,
        num_infill: int = 32,
        length: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.num_unconditional = num_unconditional
        self.num_prompted = num_prompted
        self.num_infill = num_infill
        self.length = length
        self.metrics: dict[str, float] = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        # Every rank generates (the same samples, same seed): under ZeRO-3 a forward pass gathers parameters
        # from all ranks, so a rank-zero-only generation would hang. Rank zero writes and logs.
        if trainer.interrupted or getattr(pl_module, "nonfinite_stop", None):
            return
        if max(self.num_unconditional, self.num_prompted, self.num_infill) <= 0:
            if trainer.is_global_zero:
                print(stage_line("samples", None, "skipped (samples.num_unconditional, num_prompted and num_infill are 0)"))
            return
        start = time.perf_counter()
        datamodule = trainer.datamodule
        rows, metrics = write_samples(
            pl_module,
            tokenizer=datamodule.tokenizer,
            task=getattr(datamodule, "task", None),
            length=self.length or datamodule.seq_len,
            num_unconditional=self.num_unconditional,
            num_prompted=self.num_prompted,
            num_infill=self.num_infill,
            progress=trainer.progress_bar_callback is not None and trainer.is_global_zero,
        )
        self.metrics = metrics
        if not trainer.is_global_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = _rows_of_other_kinds(self.path)  # e.g. method=grpo's rollouts, written during training
        with open(self.path, "w") as f:
            for line in kept:
                f.write(line + "\n")
            for row in rows:
                f.write(json.dumps(row) + "\n")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        scores = ", ".join(f"{k}={v:.3g}" for k, v in metrics.items())
        print(stage_line("samples", time.perf_counter() - start, f"{scores} -> {self.path}"), flush=True)


SAMPLE_KINDS = ("unconditional", "prompted", "infill")  # the rows this callback writes (and rewrites)


def _rows_of_other_kinds(path: Path) -> list[str]:
    """The lines of an existing samples.jsonl that another writer made (any kind but this callback's)."""
    if not path.is_file():
        return []
    return [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("kind") not in SAMPLE_KINDS]


@torch.no_grad()
def write_samples(
    module,
    tokenizer,
    task,
    length: int,
    num_unconditional: int,
    num_prompted: int,
    num_infill: int,
    seed: int = SAMPLE_SEED,
    progress: bool = True,
) -> tuple[list[dict], dict[str, float]]:
    """Generate and score; returns the jsonl rows and the metrics (keys `sample/...`). ``progress``: a bar over
    the samples (dlm.progress: on a terminal only)."""
    generator = torch.Generator(device=module.compute_device).manual_seed(seed)
    rows: list[dict] = []
    metrics: dict[str, float] = {}
    prompts = task.prompts(num_prompted, seed) if task is not None and num_prompted > 0 else []
    # Families that cannot condition on a suffix (AR) have no infill metric rather than a made-up one.
    items = []
    if task is not None and num_infill > 0 and module.supports_infill:
        items = [(t, p) for t, p in task.infill_items(num_infill, seed) if len(tokenizer.encode(t)) == len(t)]
    with Bar(max(num_unconditional, 0) + len(prompts) + len(items), "sampling", enabled=progress) as bar:
        _unconditional(module, tokenizer, task, length, num_unconditional, generator, rows, metrics, bar)
        _prompted(module, tokenizer, task, length, prompts, generator, rows, metrics, bar)
        _infill(module, tokenizer, task, length, items, generator, rows, metrics, bar)
    return rows, metrics


def _unconditional(module, tokenizer, task, length, num_unconditional, generator, rows, metrics, bar) -> None:
    eos = tokenizer.eos_token_id
    if num_unconditional > 0:
        start = time.perf_counter()
        gen = module.generate(None, length, num_samples=num_unconditional, generator=generator)
        elapsed = time.perf_counter() - start
        docs = [cut_at_eos(row.tolist(), eos) for row in gen.tokens]
        texts = [tokenizer.decode(d) for d in docs]
        valid = [task.is_valid(t) for t in texts] if task is not None else [None] * len(texts)
        rows += [{"kind": "unconditional", "prompt": "", "text": t, "valid": v} for t, v in zip(texts, valid)]
        metrics["sample/unigram_entropy"] = unigram_entropy(docs)
        metrics["sample/network_calls"] = float(gen.num_network_calls)
        metrics["sample/tokens_per_s"] = gen.tokens.numel() / max(elapsed, 1e-9)
        if task is not None:
            metrics.update({f"sample/{k}": v for k, v in task.score_samples(texts).items()})
        bar.advance(num_unconditional)


def _prompted(module, tokenizer, task, length, prompts, generator, rows, metrics, bar) -> None:
    eos = tokenizer.eos_token_id
    if prompts:
        correct = 0
        for prompt in prompts:  # prompts differ in length: one call each keeps this simple and exact
            ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
            gen = module.generate(ids, length - ids.shape[1], generator=generator)
            completion = tokenizer.decode(cut_at_eos(gen.tokens[0, ids.shape[1] :].tolist(), eos))
            ok = task.is_valid(prompt + completion)
            correct += ok
            rows.append({"kind": "prompted", "prompt": prompt, "text": prompt + completion, "valid": ok})
            bar.advance()
        metrics["sample/prompted_acc"] = correct / len(prompts)


def _infill(module, tokenizer, task, length, items, generator, rows, metrics, bar) -> None:
    eos = tokenizer.eos_token_id
    if items:
        correct = 0
        for text, positions in items:  # a character-level tokenizer: character i is token i
            doc = tokenizer.encode(text) + [eos] * (length - len(text))
            tokens = torch.tensor([doc[:length]], dtype=torch.long)
            fill = torch.zeros_like(tokens, dtype=torch.bool)
            fill[0, positions] = True
            gen = module.infill(tokens, fill, generator=generator)
            filled = tokenizer.decode(cut_at_eos(gen.tokens[0].tolist(), eos))
            ok = task.is_valid(filled)
            correct += ok
            template = "".join("_" if i in positions else c for i, c in enumerate(text))
            rows.append({"kind": "infill", "prompt": template, "text": filled, "valid": ok})
            bar.advance()
        metrics["sample/infill_acc"] = correct / len(items)
