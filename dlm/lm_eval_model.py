"""lm-evaluation-harness model type ``dlm``: evaluate a dlm run folder on harness tasks.

    python -m dlm.lm_eval --model dlm --model_args run=runs/mdlm-tiny/<time>,mc_num=8 --tasks <task> ...
    python -m dlm.lm_eval --model dlm --model_args model=llada_8b_instruct --tasks gsm8k ...  # no run folder

    import lm_eval, dlm.lm_eval_model  # registers "dlm"
    lm_eval.simple_evaluate(model="dlm", model_args="run=<path>,mc_num=8", tasks=[...])

lm_eval (0.4.x) finds models only in its own registry (no entry points for models), so the adapter must be
imported before lm_eval looks the name up; ``python -m dlm.lm_eval`` does that, then runs lm_eval's own CLI
with the same arguments.

model_args (``key=value,...``):

    run        the run folder or a .ckpt inside <run>/checkpoints/ (this, or model=)
    model      a conf/model option: its checkpoint without a run folder (dlm.run.load_model), with its conventions
               (tokenizer, mask, shift, default sampler); method= (default mdlm), data= and model.<key>= /
               method.<key>= overrides, e.g. model=qwen3_tiny,model.pretrained=/ckpt
    ckpt       last (default) | best | a .ckpt path
    mc_num     Monte-Carlo draws per loglikelihood request for diffusion families (default 8)
    batch_size rows per forward pass (default 16; "auto" means the default)
    device     cpu | cuda | ... (default: cuda when available)
    seed       seeds every Monte-Carlo draw and every generation (default 0): reruns give the same numbers
    estimator  auto (default) | mc | exact | bound   (see below)
    tail       none (default) | mask | eos: what follows the continuation in the scored row (see below)
    sampler    a conf/sampler option (e.g. low_confidence) to generate with instead of the run's own
    sampler_<field>   any sampler field, e.g. sampler_steps=8, sampler_temperature=0.0

loglikelihood(context, continuation) -> (log p, is_greedy):

* ``mc`` (auto for MDLM-style families, the ones with ``denoise`` and a mask schedule): LLaDA's estimator.
  With n continuation tokens, draw k = 1..mc_num draws l_k in {1..n} (stratified: l_k = (u + k) mod n + 1 for
  one uniform offset u per request, so l is uniform on {1..n} and mc_num a multiple of n covers every l
  equally), mask l_k continuation tokens chosen uniformly (the context stays clean), and score
  (n / l_k) * sum over masked positions of -log p_theta(x_i | x_masked) read from the family's ``denoise``.
  The average over draws is an unbiased estimate of the any-order bound on -log p(continuation | context);
  with n = 1 it is exactly -log p(continuation | context). is_greedy is the argmax check where the estimate is
  exact (n = 1), else False.
* ``exact`` (auto for families with ``exact_nll``, i.e. AR): the exact -log p(continuation | start, context)
  from the family's ``nll_bound`` with the loss mask on the continuation; is_greedy is the argmax check at
  every continuation position.
* ``bound`` (opt-in for other families, e.g. bd3lm, diffusionbert): the family's own ``nll_bound`` with the
  loss mask on the continuation, averaged over mc_num draws. It is a bound on the continuation given the
  context only for families that keep positions outside the loss mask clean (MDLM and BD3LM do); SUNDAE
  has no bound and raises.

``tail``: ``none`` scores the row context + continuation as LLaDA/Dream do; ``mask`` appends mask tokens up to
the data's seq_len (never scored; the continuation is scored with the rest of the row unknown, the layout
``generate`` uses); ``eos`` appends EOS fill up to seq_len (the continuation then ends the document, the
layout ``pad_each`` training rows have). Rows longer than the backbone's max_seq_len lose context from the left.

generate_until(context, gen_kwargs): ``module.generate(context, max_gen_toks)`` through the run's sampler (or
the one chosen in model_args), the new tokens cut at the first EOS and then before the first ``until`` string.
Other gen_kwargs (temperature, do_sample) are ignored: choose the decoding with ``sampler``/``sampler_*``.

loglikelihood_rolling(text): the family's ``nll_bound`` over the text's tokens (summed; exact for AR, which
scores the first token after its start token, EOS; the mean of mc_num draws of the bound otherwise). A text
longer than the backbone's max_seq_len is cut into consecutive windows whose values are summed.
"""

from __future__ import annotations

import logging
from typing import Any

import lm_eval.models  # noqa: F401  (lm_eval's own lazy model table first: registering "dlm" must not hide it)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from omegaconf import OmegaConf

from dlm.errors import UserError
from dlm.progress import Bar

# Imports inside functions: the family (MDLM), the run loader and the sampler builder load when lm-eval
# instantiates the model, not when the plugin registers `--model dlm`.

log = logging.getLogger(__name__)

__all__ = ["DLMHarnessModel", "mc_continuation_nll"]

ESTIMATORS = ("auto", "mc", "exact", "bound")
TAILS = ("none", "mask", "eos")


class ModelArgsError(UserError):
    """A --model_args value the dlm model type cannot take; the message names it and the valid form."""


def _check_counts(**values: Any) -> None:
    """model_args that are counts, before the run is loaded: mc_num, batch_size (or auto) and max_gen_toks >= 1,
    seed >= 0."""
    problems = []
    for key, value in values.items():
        if key == "batch_size" and (value is None or isinstance(value, str) and value.lower() in ("auto", "none", "")):
            continue
        low = 0 if key == "seed" else 1
        try:
            ok = not isinstance(value, bool) and int(str(value)) == float(str(value)) and int(str(value)) >= low
        except ValueError:
            ok = False
        if not ok:
            form = "an integer >= 0" if low == 0 else "a positive integer" + (" or auto" if key == "batch_size" else "")
            problems.append(f"{key}={value!r} must be {form}")
    if problems:
        raise ModelArgsError("--model_args: " + "; ".join(problems))


def _as_int(value: Any, default: int) -> int:
    if value is None or (isinstance(value, str) and value.lower() in ("auto", "none", "")):
        return default
    return int(value)


def _subclasses_mdlm(module) -> bool:
    from dlm.methods.mdlm import MDLM

    return isinstance(module, MDLM)


@torch.no_grad()
def mc_continuation_nll(
    module,
    context: list[int],
    continuation: list[int],
    mc_num: int,
    generator: torch.Generator,
    batch_size: int = 16,
    tail: list[int] | None = None,
) -> tuple[float, bool]:
    """LLaDA's Monte-Carlo estimate of -log p(continuation | context) for a masked diffusion family.

    Returns (estimate in nats, greedy) where greedy is the argmax check when the estimate is exact (one
    continuation token), else False. ``tail`` tokens follow the continuation and are never scored.
    """
    if not continuation:
        return 0.0, True
    device = module.compute_device
    tail = list(tail or [])
    n, P = len(continuation), len(context)
    seq = torch.tensor(context + continuation + tail, dtype=torch.long, device=device)
    target = seq[P : P + n]
    mc_num = max(1, int(mc_num))
    offset = int(torch.randint(n, (1,), generator=generator))
    lengths = [(offset + k) % n + 1 for k in range(mc_num)]
    masks = []
    for lk in lengths:
        order = torch.rand(n, generator=generator).argsort()[:lk]
        m = torch.zeros(seq.shape[0], dtype=torch.bool)
        m[P + order] = True
        masks.append(m)
    masks_t = torch.stack(masks).to(device)
    rows_t = torch.where(masks_t, module.mask_id, seq[None, :].expand(mc_num, -1))
    tail_masked = torch.zeros_like(masks_t)
    tail_masked[:, P + n :] = rows_t[:, P + n :] == module.mask_id
    total = 0.0
    greedy = False
    for i in range(0, mc_num, batch_size):
        xt = rows_t[i : i + batch_size]
        time = None
        if getattr(module, "_time_conditioned", False):
            # As MDLM.infill: t from the fraction of the positions being denoised that is still masked.
            denom = float(n + int(tail_masked[0].sum()))
            time = (xt == module.mask_id).sum(1).float() / max(denom, 1.0)
        logp = module.denoise(xt, time=time)  # [b, L, V]
        tok_logp = logp[:, P : P + n].gather(-1, target[None, :, None].expand(xt.shape[0], -1, 1))[..., 0]
        m = masks_t[i : i + batch_size, P : P + n]
        nll = -(tok_logp * m).sum(1)  # [b]
        l_b = m.sum(1).float()
        total += float((nll * n / l_b).sum())
        if n == 1 and i == 0:
            greedy = bool(logp[0, P].argmax() == target[0])
    return total / mc_num, greedy


def _override_value(value: Any) -> str:
    """A model_args value (lm_eval turns "true" and numbers into Python values) as a Hydra override value."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


@register_model("dlm")
class DLMHarnessModel(LM):
    """A dlm run as an lm-evaluation-harness model (see the module docstring for model_args)."""

    def __init__(
        self,
        run: str | None = None,
        ckpt: str = "last",
        mc_num: int = 8,
        batch_size: int | str | None = 16,
        device: str | None = None,
        seed: int = 0,
        estimator: str = "auto",
        tail: str = "none",
        sampler: str | None = None,
        max_gen_toks: int = 256,
        max_batch_size: Any = None,  # passed by lm_eval; unused
        module: Any = None,
        tokenizer: Any = None,
        seq_len: int | None = None,
        model: str | None = None,
        method: str | None = None,
        data: str | None = None,
        **sampler_fields: Any,
    ):
        """From a run folder (`run=`, what lm_eval's model_args give), from a model config's checkpoint without a
        run folder (`model=<conf/model option>`, optionally `method=`, `data=` and `model.<key>=...` /
        `method.<key>=...` overrides: dlm.run.load_model), or, from Python, from a DiffusionLM in memory (`module=`,
        with `tokenizer=` defaulting to module.tokenizer and `seq_len=` for tail=mask|eos)."""
        super().__init__()
        given = [name for name, value in (("run", run), ("model", model), ("module", module)) if value is not None]
        if len(given) != 1:
            raise ModelArgsError("model_args needs run=<run folder | .ckpt> or model=<conf/model option>, e.g. "
                                 "--model_args run=runs/mdlm-tiny/<time> or --model_args model=llada_8b_instruct"
                                 + (f" (got {' and '.join(given)}: pass one)" if given else ""))
        overrides = {k: v for k, v in sampler_fields.items()
                     if k.lstrip("+~").split(".")[0] in ("model", "method", "data")}
        if overrides and model is None:
            raise ModelArgsError(f"model_args {sorted(overrides)} override a model config: they need model=<option>")
        sampler_fields = {k: v for k, v in sampler_fields.items() if k not in overrides}
        bad = [k for k in sampler_fields if not k.startswith("sampler_")]
        if bad:
            raise ModelArgsError(
                f"unknown model_args {bad}: known are run, model, method, data, model.<key>, method.<key>, ckpt, "
                f"mc_num, batch_size, device, seed, estimator, tail, sampler, max_gen_toks and sampler_<field> (e.g. "
                f"sampler_steps=8)"
            )
        _check_counts(mc_num=mc_num, seed=seed, max_gen_toks=max_gen_toks, batch_size=batch_size)
        from dlm.run import load_run

        if device in (None, "", "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's CLI passes --device cuda unless told otherwise; on a machine without CUDA run on the CPU.
            log.warning("device=%s asked for but CUDA is not available: evaluating on the CPU", device)
            device = "cpu"
        if model is not None:
            from dlm.run import load_model

            args = [*([f"data={data}"] if data else []), *(f"{k}={_override_value(v)}" for k, v in overrides.items())]
            self.loaded = load_model(str(model), args, method=method, device=device)
            self.module = self.loaded.module
            self.tok = self.loaded.datamodule.tokenizer
        elif run is not None:
            self.loaded = load_run(run, ckpt=ckpt, device=device, setup_data=False)
            self.module = self.loaded.module
            self.tok = self.loaded.datamodule.tokenizer
            seq_len = seq_len or getattr(self.loaded.datamodule, "seq_len", None)
        else:
            self.loaded = None
            self.module = module.to(device).eval()
            self.tok = tokenizer if tokenizer is not None else module.tokenizer
        self._device = torch.device(device)
        self.mc_num = int(mc_num)  # checked >= 1: 0 is refused, never read as 1
        self.batch_size = _as_int(batch_size, 16)
        self.seed = int(seed)
        self.max_gen_toks = int(max_gen_toks)
        if estimator not in ESTIMATORS:
            raise ModelArgsError(f"estimator={estimator!r}: choose one of {', '.join(ESTIMATORS)}")
        if tail not in TAILS:
            raise ModelArgsError(f"tail={tail!r}: choose one of {', '.join(TAILS)}")
        self.estimator = self._resolve_estimator(estimator)
        self.tail = tail
        self.seq_len = int(seq_len or 0)
        self.max_len = getattr(self.module.backbone, "max_seq_len", None)
        self.sampler = self._build_sampler(sampler, {k[len("sampler_"):]: v for k, v in sampler_fields.items()})

    # ---- set-up ----------------------------------------------------------------------------------------------
    def _resolve_estimator(self, estimator: str) -> str:
        exact = self.module.exact_nll
        mdlm = _subclasses_mdlm(self.module)
        if estimator == "auto":
            if exact:
                return "exact"
            if mdlm:
                return "mc"
            return "none"  # loglikelihood raises with the alternatives named
        if estimator == "exact" and not exact:
            raise ModelArgsError(f"estimator=exact needs a family with an exact NLL (method=ar), not "
                                 f"{type(self.module).__name__}; use estimator=mc or bound")
        if estimator == "mc" and not mdlm:
            raise ModelArgsError(f"estimator=mc needs a masked diffusion family (method=mdlm), not "
                                 f"{type(self.module).__name__}; use estimator=bound (or exact for AR)")
        return estimator

    def _build_sampler(self, name: str | None, fields: dict[str, Any]):
        if name is None and not fields:
            return None  # the run's own sampler
        from dlm.build import build_sampler, sampler_config
        from dlm.config import ConfigError, group_options

        if name is None:
            if self.loaded is None:
                raise ModelArgsError("sampler_<field> without sampler=<name> needs a run's config; pass sampler=<name>")
            base = OmegaConf.to_container(self.loaded.cfg.sampler, resolve=True)
        else:
            try:
                base = sampler_config(str(name))
            except ConfigError:
                raise ModelArgsError(f"sampler={name}: no conf/sampler/{name}.yaml; choose one of "
                                     f"{', '.join(group_options('sampler'))}") from None
        return build_sampler(base, fields=fields, key="--model_args sampler")

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text)) if text else []

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + index)

    def _tail(self, used: int) -> list[int]:
        if self.tail == "none" or self.seq_len <= used:
            return []
        fill = self.module.mask_id if self.tail == "mask" else self.module.eos_id
        return [fill] * (self.seq_len - used)

    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context, cut from the left so that context + continuation fits the backbone."""
        if self.max_len is None:
            return context
        room = int(self.max_len) - len(continuation) - (1 if self.estimator == "exact" else 0)
        if room < 0:
            raise ValueError(f"a continuation of {len(continuation)} tokens exceeds the model's max_seq_len={self.max_len}")
        return context[len(context) - room :] if len(context) > room else context

    # ---- loglikelihood ---------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if self.estimator == "none":
            raise NotImplementedError(
                f"{type(self.module).__name__} has no continuation likelihood estimator by default: pass "
                f"estimator=bound in model_args to use the family's own nll_bound with the loss mask on the "
                f"continuation (a bound only where the family keeps unmasked positions clean)"
            )
        pairs = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            cont = self._encode(continuation)
            pairs.append((self._fit(self._encode(context), cont), cont))
        with Bar(len(pairs), "lm-eval loglikelihood", enabled=not disable_tqdm) as bar:
            if self.estimator == "exact":
                results = self._exact(pairs, bar)
            else:
                results = []
                for i, (ctx, cont) in enumerate(pairs):
                    gen = self._generator(i)
                    if self.estimator == "mc":
                        tail = self._tail(len(ctx) + len(cont))
                        nll, greedy = mc_continuation_nll(self.module, ctx, cont, self.mc_num, gen, self.batch_size,
                                                          tail)
                    else:
                        nll, greedy = self._bound(ctx, cont, gen), False
                    results.append((-nll, greedy))
                    bar.advance()
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    @torch.no_grad()
    def _exact(self, pairs: list[tuple[list[int], list[int]]], bar) -> list[tuple[float, bool]]:
        module, device = self.module, self.module.compute_device
        out: list[tuple[float, bool]] = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i : i + self.batch_size]
            width = max(len(c) + len(y) for c, y in chunk)
            ids = torch.full((len(chunk), max(width, 1)), module.eos_id, dtype=torch.long)
            counted = torch.zeros_like(ids, dtype=torch.bool)
            for j, (c, y) in enumerate(chunk):
                ids[j, : len(c) + len(y)] = torch.tensor(c + y, dtype=torch.long)
                counted[j, len(c) : len(c) + len(y)] = True
            ids, counted = ids.to(device), counted.to(device)
            # Causal: the right fill never changes the scores of the positions before it.
            logits = module.next_token_logits(ids) if hasattr(module, "next_token_logits") else None
            if logits is not None:
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none") * counted
                greedy = (logits.argmax(-1) == ids) | ~counted
            else:
                nll = module.nll_bound({"input_ids": ids, "loss_mask": counted})
                greedy = torch.zeros_like(counted)
            for j in range(len(chunk)):
                out.append((-float(nll[j].sum()), bool(greedy[j].all()) if logits is not None else False))
            bar.advance(len(chunk))
        return out

    @torch.no_grad()
    def _bound(self, ctx: list[int], cont: list[int], gen: torch.Generator) -> float:
        """Mean over mc_num draws of the family's nll_bound summed over the continuation."""
        if not cont:
            return 0.0
        device = self.module.compute_device
        seq = ctx + cont + self._tail(len(ctx) + len(cont))
        ids = torch.tensor(seq, dtype=torch.long, device=device)
        counted = torch.zeros(len(seq), dtype=torch.bool, device=device)
        counted[len(ctx) : len(ctx) + len(cont)] = True
        total = 0.0
        for i in range(0, self.mc_num, self.batch_size):
            b = min(self.batch_size, self.mc_num - i)
            seed = int(torch.randint(2**62, (1,), generator=gen))
            g = torch.Generator(device=device).manual_seed(seed)
            torch.manual_seed(seed)  # a family that draws from the global RNG
            nll = self.module.nll_bound({"input_ids": ids[None].expand(b, -1).clone(),
                                         "loss_mask": counted[None].expand(b, -1).clone()}, generator=g)
            total += float((nll.float() * counted).sum())
        return total / self.mc_num

    # ---- rolling loglikelihood (perplexity tasks) --------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: the family's nll_bound summed over the text (exact for AR, the mean of
        mc_num draws otherwise). A text longer than the model's context is cut into consecutive windows of at
        most max_seq_len tokens, each scored on its own (no context carried over: the practice of MDLM's and
        BD3-LM's OpenWebText evaluations), and the windows' values are summed."""
        exact = self.module.exact_nll
        limit = None if self.max_len is None else int(self.max_len) - (1 if exact else 0)
        out = []
        with Bar(len(requests), "lm-eval loglikelihood_rolling", enabled=not disable_tqdm) as bar:
            for i, req in enumerate(requests):
                ids = self._encode(req.args[0])
                windows = [ids] if limit is None else [ids[k : k + limit] for k in range(0, len(ids), limit)]
                gen = self._generator(i)
                value = -sum(self._text_nll(window, gen, exact) for window in windows if window)
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, value)
                out.append(value)
                bar.advance()
        return out

    def _text_nll(self, ids: list[int], gen: torch.Generator, exact: bool) -> float:
        """The family's nll_bound of one window, summed over its tokens and averaged over the draws."""
        device = self.module.compute_device
        draws = 1 if exact else self.mc_num
        x = torch.tensor(ids, dtype=torch.long, device=device)
        total = 0.0
        for k in range(0, draws, self.batch_size):
            b = min(self.batch_size, draws - k)
            seed = int(torch.randint(2**62, (1,), generator=gen))
            g = torch.Generator(device=device).manual_seed(seed)
            torch.manual_seed(seed)
            batch = {"input_ids": x[None].expand(b, -1).clone(),
                     "loss_mask": torch.ones(b, len(ids), dtype=torch.bool, device=device)}
            total += float(self.module.nll_bound(batch, generator=g).float().sum())
        return total / draws

    # ---- generation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prepared = []
        for i, req in enumerate(requests):
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            length = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self._encode(context)
            if self.max_len is not None:
                length = max(1, min(length, int(self.max_len) - 1))
                ids = self._fit(ids, [0] * length)
            prepared.append((i, ids, length, until))
        results: list[str | None] = [None] * len(requests)
        # Batch requests of equal context and generation length (one sampler call per group).
        groups: dict[tuple[int, int], list] = {}
        for item in prepared:
            groups.setdefault((len(item[1]), item[2]), []).append(item)
        with Bar(len(prepared), "lm-eval generate_until", enabled=not disable_tqdm) as bar:
            for (_, length), items in groups.items():
                for s in range(0, len(items), self.batch_size):
                    chunk = items[s : s + self.batch_size]
                    prompt = torch.tensor([it[1] for it in chunk], dtype=torch.long).reshape(len(chunk), -1)
                    gen = self._generator(chunk[0][0])
                    out = self.module.generate(prompt if prompt.shape[1] else None, length, sampler=self.sampler,
                                               num_samples=len(chunk), generator=gen)
                    tokens = out.tokens
                    for row, (idx, ids, _, until) in zip(tokens.cpu(), chunk):
                        text = self.tok.decode_until_eos(row[len(ids) :])
                        cut = min((text.find(u) for u in until if u and u in text), default=len(text))
                        results[idx] = text[:cut]
                    bar.advance(len(chunk))
        for req, text in zip(requests, results):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return [r if r is not None else "" for r in results]

    # ---- identification ----------------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.fingerprint()) if hasattr(self.tok, "fingerprint") else type(self.tok).__name__

    @property
    def eot_token_id(self) -> int:
        return int(self.module.eos_id)

    def __repr__(self) -> str:
        where = self.loaded.run_dir if self.loaded is not None else "<in memory>"
        return (f"DLMHarnessModel(run={where}, family={type(self.module).__name__}, "
                f"estimator={self.estimator}, mc_num={self.mc_num}, tail={self.tail})")

