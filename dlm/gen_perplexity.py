"""Generative perplexity (``python -m dlm.evaluate scorer=...``): the NLL of a run's samples under a scorer, an HF
causal LM by hub id or folder (:class:`HFScorer`, exact) or a dlm run (:class:`RunScorer`: exact for AR, else its
bound). The scorer is checked before an evaluation starts (:func:`scorer_problem`), not after it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from dlm.errors import UserError
from dlm.likelihood import likelihood
from dlm.run import LoadedRun, load_run
from dlm.run_folder import RunFolder


class HFScorer:
    """Exact NLL of texts under a Hugging Face causal LM (hub name or local folder)."""

    exact = True

    def __init__(self, name_or_path: str, device: str = "cpu", batch_size: int = 16):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = str(name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.name)
        self.model = AutoModelForCausalLM.from_pretrained(self.name).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_len = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", 1024)

    @torch.no_grad()
    def nll(self, texts: list[str]) -> tuple[float, int]:
        """(summed NLL in nats, number of scored tokens). Each text is scored after a BOS (or EOS when the
        tokenizer has no BOS, as GPT-2 does) and including a closing EOS, so every token of it counts."""
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        docs = []
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if tok.eos_token_id is not None:
                ids = ids + [tok.eos_token_id]
            if start is not None:
                ids = [start] + ids
            docs.append(ids[: self.max_len])
        total, count = 0.0, 0
        for i in range(0, len(docs), self.batch_size):
            chunk = [d for d in docs[i : i + self.batch_size] if len(d) > 1]
            if not chunk:
                continue
            width = max(len(d) for d in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, d in enumerate(chunk):
                ids[j, : len(d)] = torch.tensor(d)
                mask[j, : len(d)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target, counted = ids[:, 1:], mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            total += float(nll[counted].sum())
            count += int(counted.sum())
        return total, count


class RunScorer:
    """NLL of texts under a dlm run: exact for a family with `exact_nll` (AR), else its bound (K draws)."""

    def __init__(self, run: LoadedRun, num_mc: int = 8, seed: int = 0, batch_size: int = 16):
        self.run = run
        self.name = str(run.run_dir)
        self.exact = run.module.exact_nll
        self.num_mc = 1 if self.exact else num_mc
        self.seed = seed
        self.batch_size = batch_size

    @torch.no_grad()
    def nll(self, texts: list[str]) -> tuple[float, int]:
        """Texts become rows the way the run's data made them (one document per row, EOS fill)."""
        from dlm.data.packing import pad_each

        tok, dm = self.run.datamodule.tokenizer, self.run.datamodule
        docs = [tok.encode(t) for t in texts]
        rows = pad_each(docs, dm.seq_len, tok.eos_token_id)
        ids = torch.from_numpy(rows["input_ids"])
        counted = torch.from_numpy(rows["loss_mask"])
        # Score each document and its first EOS; the remaining fill is the data's convention, not the text.
        lengths = torch.tensor([min(len(d) + 1, dm.seq_len) for d in docs])
        counted &= torch.arange(dm.seq_len)[None, :] < lengths[:, None]
        batches = [{"input_ids": ids[i : i + self.batch_size], "loss_mask": counted[i : i + self.batch_size]}
                   for i in range(0, len(docs), self.batch_size)]
        out = likelihood(self.run.module, batches, num_mc=self.num_mc, seed=self.seed)
        if out["nll_bound"] is None:
            raise ValueError(f"scorer {self.name} cannot score texts: {out['nll_bound_error']}")
        return out["nll_bound"] * out["nll_bound_tokens"], out["nll_bound_tokens"]


def scorer_problem(spec: str) -> str | None:
    """Why the scorer ``spec`` cannot be loaded here (no such folder; a hub model while offline), or None. Checked
    before the evaluation starts, not after it."""
    from dlm.data.hub import looks_like_path, tokenizer_problem

    path = Path(spec).expanduser()
    if RunFolder(path).is_run() or path.suffix == ".ckpt":
        return None
    if looks_like_path(str(spec)) and not path.exists():
        return f"scorer={spec}: no such folder; give a dlm run folder, a local HF causal LM folder, or a hub id such as gpt2"
    if tokenizer_problem(str(spec)):  # a hub id, offline, not cached (the tokenizer's check answers for the model)
        return (f"scorer={spec} is a model on the Hugging Face Hub and this machine is offline (HF_HUB_OFFLINE=1) with "
                f"no copy in the local HF cache: point scorer at a local HF causal LM folder or a dlm run folder")
    return None


def make_scorer(spec: str, device: str, num_mc: int, seed: int, batch_size: int):
    path = Path(spec).expanduser()
    if RunFolder(path).is_run() or path.suffix == ".ckpt":
        return RunScorer(load_run(path, device=device), num_mc=num_mc, seed=seed, batch_size=batch_size)
    problem = scorer_problem(spec)
    if problem:
        raise UserError(problem)
    try:
        return HFScorer(spec, device=device, batch_size=batch_size)
    except OSError as err:  # transformers' answer to a folder or id without a causal LM
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"scorer={spec}: could not load an HF causal LM ({first}); give a dlm run folder, a local "
                        f"HF causal LM folder, or a hub id such as gpt2") from err


def generative_perplexity(texts: list[str], scorer) -> dict[str, Any]:
    texts = [t for t in texts if t]
    if not texts:
        return {"gen_nll": None, "gen_ppl": None, "gen_ppl_scorer": scorer.name, "gen_ppl_tokens": 0,
                "gen_ppl_exact": bool(scorer.exact), "gen_ppl_error": "every unconditional sample was empty"}
    total, count = scorer.nll(texts)
    nll = total / count if count else float("nan")
    return {"gen_nll": nll, "gen_ppl": math.exp(nll) if count else None, "gen_ppl_scorer": scorer.name,
            "gen_ppl_tokens": count, "gen_ppl_exact": bool(scorer.exact)}
