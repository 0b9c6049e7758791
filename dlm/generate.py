"""Sample from a run: `python -m dlm.generate run=<run folder | .ckpt | HF folder> [prompt="..."] [infill="..."]`.

    python -m dlm.generate run=runs/mdlm-tiny/... prompt="47+8="                      # complete a prompt
    python -m dlm.generate run=runs/mdlm-tiny/... infill="4[MASK:1]+8=55"             # fill holes
    python -m dlm.generate run=runs/mdlm-tiny/... num_samples=4 length=12             # unconditional
    python -m dlm.generate run=... prompt="1+2=" sampler=threshold sampler.threshold=0.8 trajectory=true

Every family goes through the one interface, ``module.generate(prompt, length, sampler)`` or
``module.infill(tokens, fill_mask, sampler)``; the sampler is the run's own (``sampler`` left null) or one
composed from ``conf/sampler``. Prints the text of every sample, then the number of network calls, the tokens
and the speed. ``trajectory=true`` records the denoising steps and writes a self-contained HTML page that
animates them (``trajectory: <path>`` on the last line). The AR family records no frames; its trajectory is
rebuilt exactly from the output (one token per network call, left to right). A family that returns no
trajectory otherwise (BD3-LM runs its sampler block by block) gets a two-frame page (start and end) that says so.

``compile=<mode>`` (``default``, ``reduce-overhead``: CUDA graphs, ``max-autotune``) compiles the backbone with
``torch.compile`` (:mod:`dlm.compile`: the samplers' fixed-shape denoiser calls, and the KV-cache paths through a
static cache; ``static_kv_cache=false`` keeps a growing cache, run eagerly) and runs the request once untimed first,
so the printed speed leaves compilation out.

Infill templates: literal text with holes ``[MASK]`` (one token) or ``[MASK:n]`` (n tokens), e.g.
``"The [MASK:5] sat on the [MASK:3]."`` (text that tokenizes as the run's tokenizer does: the arithmetic
runs use characters ``0-9 + =``). The template is padded with EOS up to ``length`` (default: the data's
seq_len), the EOS-fill convention of the embedded data.

HF folders: a folder written by ``AR.export_hf`` (an HF ``save_pretrained`` causal LM, or the native
``config.json`` + ``model.safetensors``), or any local HF causal LM folder with its tokenizer, is generated
from as ``method=ar`` (next-token decoding with a KV cache). The tokenizer comes from the folder, else from the
run folder around it (``<run>/hf``). Diffusion families are loaded from their run folder, not from an export.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dlm import checks
from dlm.build import build_sampler
from dlm.compile import check_mode, compile_backbone
from dlm.config import CONF_DIR, ConfigError, preflight, register_resolvers
from dlm.errors import EXIT_USER_ERROR, UserError, user_errors
from dlm.models.capabilities import BackboneCapabilities
from dlm.run import NotARunError
from dlm.run_folder import RunFolder
from dlm.sampling.base import cut_at_eos

register_resolvers()

HOLE = re.compile(r"\[MASK(?::(\d+))?\]")
HOLE_LIKE = re.compile(r"\[\s*mask\b[^\]]*\]?", re.IGNORECASE)  # anything that was meant as a hole
DEFAULT_LENGTH = 32


class GenerateError(UserError):
    """A request the CLI cannot serve; the message says what is supported."""


@dataclass
class Loaded:
    module: Any
    tokenizer: Any
    seq_len: int | None
    sampler_cfg: dict | None  # the run's sampler config (None: the family's default)
    run_dir: Path
    kind: str  # "run" | "hf"


# ---- loading ----------------------------------------------------------------------------------------------------
class HFCausalBackbone(nn.Module):
    """A plain HF causal LM behind the native backbone's call signature (logits, optional KV cache)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.max_seq_len = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)

    capabilities = BackboneCapabilities(kv_cache=True)

    def forward(self, input_ids: Tensor, *, attention: str | None = None, past_key_values=None, use_cache: bool = False,
                **_: Any):
        if attention not in (None, "causal"):
            raise GenerateError(f"an HF causal LM folder runs causal attention only, not {attention!r}")
        out = self.model(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache)
        logits = out.logits.float()
        return (logits, out.past_key_values) if use_cache else logits


def _hf_tokenizer(path: Path):
    from dlm.data.tokenizers import HFTokenizer

    if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return HFTokenizer(str(path))
    parent_cfg = RunFolder(path.parent).config
    if parent_cfg.is_file():  # <run>/hf: the run's own tokenizer (e.g. characters, which save no files)
        from dlm.run import load_config

        return instantiate(load_config(path.parent).data.tokenizer)
    raise GenerateError(f"{path} has no tokenizer files and is not inside a run folder: cannot decode its tokens")


def load_hf_folder(path: Path, device: str) -> Loaded:
    from dlm.methods.ar import AR
    from dlm.models.transformer import Transformer

    export = json.loads((path / "dlm_export.json").read_text()) if (path / "dlm_export.json").is_file() else {}
    method = export.get("method", "ar")
    if method != "ar":
        raise GenerateError(
            f"{path} is an export of method={method}; generating from an HF folder supports method=ar exports and plain "
            f"HF causal LMs. Generate from the run folder it came from instead."
        )
    config = json.loads((path / "config.json").read_text())
    if config.get("architecture") == "dlm.models.Transformer":
        backbone = Transformer.from_pretrained(path)
    else:
        from transformers import AutoModelForCausalLM

        backbone = HFCausalBackbone(AutoModelForCausalLM.from_pretrained(str(path)))
    tokenizer = _hf_tokenizer(path)
    module = AR(backbone, tokenizer, start_token_id=export.get("start_token_id"))
    module.to(device).eval()
    return Loaded(module, tokenizer, None, None, path, "hf")


def load_for_generation(path: str | Path, ckpt: str = "last", device: str = "cpu", use_ema: bool = True) -> Loaded:
    """A run folder / .ckpt (any family; its EMA weights when it has them and ``use_ema``) or an HF folder
    (method=ar)."""
    from dlm.run import load_run, plain

    p = Path(path).expanduser()
    if p.is_dir() and (p / "config.json").is_file() and not RunFolder(p).is_run():
        return load_hf_folder(p, device)
    run = load_run(p, ckpt=ckpt, device=device, setup_data=False, use_ema=use_ema)
    tokenizer = run.datamodule.tokenizer
    return Loaded(run.module, tokenizer, getattr(run.datamodule, "seq_len", None), plain(run.cfg.get("sampler")),
                  run.run_dir, "run")


# ---- requests -----------------------------------------------------------------------------------------------------
def parse_template(template: str, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids and the positions to fill of an infill template with ``[MASK]`` / ``[MASK:n]`` holes."""
    for match in HOLE_LIKE.finditer(template):
        if not HOLE.fullmatch(match.group(0)):
            raise GenerateError(
                f"infill: malformed hole {match.group(0)!r} at character {match.start()} of {template!r}; write "
                f"[MASK] (one token) or [MASK:n] (n tokens, n a positive integer)"
            )
    ids: list[int] = []
    fill: list[bool] = []
    pos = 0
    for match in HOLE.finditer(template):
        literal = tokenizer.encode(template[pos : match.start()]) if match.start() > pos else []
        ids += literal
        fill += [False] * len(literal)
        n = int(match.group(1) or 1)
        if n < 1:
            raise GenerateError(f"infill: a hole needs at least one token: {match.group(0)!r}; write [MASK] or "
                                f"[MASK:n] with n >= 1")
        ids += [tokenizer.mask_token_id] * n
        fill += [True] * n
        pos = match.end()
    literal = tokenizer.encode(template[pos:]) if pos < len(template) else []
    ids += literal
    fill += [False] * len(literal)
    if not any(fill):
        raise GenerateError(f"the infill template {template!r} has no hole: write [MASK] or [MASK:n] where to fill")
    return ids, fill


def request_sampler(cfg: DictConfig, loaded: Loaded):
    """The composed sampler (cfg.sampler), else the run's, else None (the family's default); shorthands on top
    (dlm.build.build_sampler)."""
    node = cfg.get("sampler")
    base = OmegaConf.to_container(node, resolve=True) if node is not None else loaded.sampler_cfg
    overrides = OmegaConf.to_container(cfg.get("sampler_args") or OmegaConf.create({}), resolve=True)
    if base is None:
        if cfg.get("steps") is not None or overrides:
            raise GenerateError("steps / sampler_args need a sampler: choose one with sampler=<name>")
        return None
    sampler = build_sampler(base, cfg.get("steps"), overrides)
    if cfg.get("trajectory") and hasattr(sampler, "record_trajectory"):
        sampler.record_trajectory = True
    if cfg.get("eos_fill") and hasattr(sampler, "eos_id"):
        sampler.eos_id = int(loaded.tokenizer.eos_token_id)
    return sampler


def _ar_trajectory(start: Tensor, final: Tensor, calls: int, mask_id: int) -> list[Tensor]:
    """Left-to-right frames of AR decoding: frame k shows the first k generated tokens (one per network call)."""
    first = int((start == mask_id).long().argmax(dim=1).min()) if (start == mask_id).any() else start.shape[1]
    frames = [start.clone()]
    for k in range(1, calls + 1):
        x = final.clone()
        x[:, first + k :] = torch.where(start[:, first + k :] == mask_id, mask_id, x[:, first + k :])
        frames.append(x)
    if not torch.equal(frames[-1], final):
        frames.append(final.clone())
    return frames


def check_request(cfg: DictConfig) -> None:
    """The request's own values, checked before the run is loaded; every problem in one ConfigError."""
    problems = []
    if OmegaConf.is_missing(cfg, "run") or not cfg.get("run"):
        problems.append("run= is required: a run folder (printed as `run_dir: ...` by python -m dlm.train), a .ckpt "
                        "inside <run>/checkpoints/, or an HF folder written by AR.export_hf")
    problems += checks.collect(
        checks.integer(cfg, "num_samples", 1),
        checks.integer(cfg, "length", 1, nullable=True, null_means=": the data's seq_len"),
        checks.integer(cfg, "steps", 1, nullable=True, null_means=": the sampler's own"),
        checks.integer(cfg, "seed", 0, 2**32 - 1),
        checks.boolean(cfg, "use_ema"),
        checks.boolean(cfg, "trajectory"),
        checks.boolean(cfg, "eos_fill"),
    )
    for key in ("prompt", "infill"):
        if cfg.get(key) is not None and not isinstance(cfg.get(key), str):
            problems.append(f"{key}={cfg.get(key)!r} must be text (quote it: {key}='...')")
    try:
        torch.device(str(cfg.get("device", "cpu")))
    except RuntimeError:
        problems.append(f"device={cfg.get('device')!r} is not a torch device; use cpu, cuda or cuda:<index>")
    if problems:
        raise ConfigError(problems)


def run_generation(cfg: DictConfig) -> dict[str, Any]:
    """Generate as the config asks; returns texts, network calls, tokens, seconds and the trajectory path."""
    check_request(cfg)
    compile_mode = cfg.get("compile")
    check_mode(compile_mode)  # before loading: a bad mode fails at once
    static_kv_cache = cfg.get("static_kv_cache")
    if static_kv_cache not in (None, True, False):
        raise GenerateError(f"static_kv_cache must be true, false or null (static exactly when compiled), "
                            f"got {static_kv_cache!r}")
    loaded = load_for_generation(cfg.run, ckpt=cfg.get("ckpt", "last"), device=cfg.get("device", "cpu"),
                                 use_ema=bool(cfg.get("use_ema", True)))
    module, tok = loaded.module, loaded.tokenizer
    compile_backbone(module.backbone, compile_mode)
    module.static_kv_cache = static_kv_cache
    sampler = request_sampler(cfg, loaded)
    device = module.compute_device
    n = int(cfg.num_samples)  # checked >= 1 (check_request): 0 is refused, never read as 1
    eos, mask_id = int(tok.eos_token_id), int(module.mask_id)
    length = cfg.get("length")
    if cfg.get("infill") is not None and cfg.get("prompt") is not None:
        raise GenerateError("give prompt= or infill=, not both")

    if cfg.get("infill") is not None:
        ids, fill = parse_template(str(cfg.infill), tok)
        width = int(length) if length is not None else (loaded.seq_len or len(ids))
        if width > len(ids):
            ids, fill = ids + [eos] * (width - len(ids)), fill + [False] * (width - len(ids))
        tokens = torch.tensor([ids] * n, dtype=torch.long)
        fill_mask = torch.tensor([fill] * n, dtype=torch.bool)
        start = tokens.masked_fill(fill_mask, mask_id)
        new_tokens = int(fill_mask.sum())

        def request(generator):
            return module.infill(tokens, fill_mask, sampler=sampler, generator=generator)

        def decode(gen) -> list[str]:
            return [tok.decode(cut_at_eos(row.tolist(), eos)) for row in gen.tokens.cpu()]
    else:
        prompt_text = cfg.get("prompt") or ""
        ids = tok.encode(prompt_text) if prompt_text else []
        if length is None:
            length = (loaded.seq_len - len(ids)) if loaded.seq_len and loaded.seq_len > len(ids) else DEFAULT_LENGTH
        length = int(length)
        if length < 1:
            raise GenerateError(f"length must be >= 1, got {length}")
        prompt = torch.tensor([ids] * n, dtype=torch.long) if ids else None
        P = len(ids)
        start = torch.cat([torch.tensor([ids] * n, dtype=torch.long).view(n, P),
                           torch.full((n, length), mask_id, dtype=torch.long)], dim=1)
        new_tokens = n * length

        def request(generator):
            return module.generate(prompt, length, sampler=sampler, num_samples=n, generator=generator)

        def decode(gen) -> list[str]:
            return [prompt_text + tok.decode(cut_at_eos(row[P:].tolist(), eos)) for row in gen.tokens.cpu()]

    compile_seconds = None
    if compile_mode is not None:  # compile (and capture CUDA graphs) on an untimed run of the same request
        warm = time.perf_counter()
        request(torch.Generator(device=device).manual_seed(int(cfg.seed)))
        compile_seconds = time.perf_counter() - warm
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    torch.manual_seed(int(cfg.seed))
    started = time.perf_counter()
    gen = request(generator)
    seconds = time.perf_counter() - started
    texts = decode(gen)

    out: dict[str, Any] = {"texts": texts, "network_calls": int(gen.num_network_calls), "tokens": new_tokens,
                           "seconds": seconds, "sampler": repr(sampler) if sampler is not None else "the family's default",
                           "trajectory": None, "compile": compile_mode, "compile_seconds": compile_seconds}
    if cfg.get("trajectory"):
        from dlm.methods.ar import AR
        from dlm.sampling.trajectory_html import write_trajectory_html

        frames = gen.trajectory
        note = ""
        if frames is None and isinstance(module, AR):
            frames = _ar_trajectory(start, gen.tokens.cpu(), gen.num_network_calls, mask_id)
            note = "autoregressive: one token per network call"
        elif frames is None:
            frames = [start, gen.tokens.cpu()]
            note = f"{type(module).__name__} records no per-step frames: start and end only"
        frames = [f.cpu() for f in frames]
        path = Path(cfg.output) if cfg.get("output") else (
            loaded.run_dir / "trajectory.html" if loaded.kind == "run" else Path.cwd() / "trajectory.html")
        meta = f"{loaded.run_dir} · {type(module).__name__} · {out['sampler']} · {gen.num_network_calls} network calls"
        write_trajectory_html(path, frames, tok, mask_id, texts, meta=(meta + (" · " + note if note else "")))
        out["trajectory"] = str(path)
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def hydra_main(cfg: DictConfig) -> None:
    from dlm.methods.ar import InfillNotSupportedError

    try:
        with user_errors():
            out = run_generation(cfg)
    except (NotARunError, ValueError, InfillNotSupportedError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    for text in out["texts"]:
        print(text)
    rate = out["tokens"] / max(out["seconds"], 1e-9)
    print(f"network calls: {out['network_calls']} | tokens: {out['tokens']} | {out['seconds']:.3f} s | "
          f"{rate:.1f} tokens/s | sampler: {out['sampler']}"
          + (f" | compile: {out['compile']} (untimed warm-up run: {out['compile_seconds']:.1f} s)" if out["compile"] else ""))
    if out["trajectory"]:
        print(f"trajectory: {out['trajectory']}")


TEXT_KEYS = ("prompt", "infill")


def quote_text_overrides(argv: list[str]) -> list[str]:
    """``prompt=47+8=`` and ``infill=The [MASK:5] sat`` as the shell passes them are not valid Hydra override values
    (``=``, ``[``, spaces); quote them so any text goes through verbatim. Already quoted values are kept."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in TEXT_KEYS and not (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):
            arg = f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(arg)
    return out


def main() -> None:
    sys.argv[1:] = quote_text_overrides(sys.argv[1:])
    problems = preflight([a for a in sys.argv[1:] if "=" in a], "generate")  # e.g. sampler=nosuch: one message
    if problems:
        print("error: invalid arguments:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    hydra_main()


if __name__ == "__main__":
    main()
