"""Sample from a run: `python -m dlm.generate run=<run folder | .ckpt | HF folder> [prompt="..."] [infill="..."]`.

    python -m dlm.generate run=runs/mdlm-tiny/... prompt="47+8="                      # complete a prompt
    python -m dlm.generate run=runs/mdlm-tiny/... infill="4[MASK:1]+8=55"             # fill holes
    python -m dlm.generate run=runs/mdlm-tiny/... num_samples=4 length=12             # unconditional
    python -m dlm.generate run=... messages='[{"role":"user","content":"hi"}]'     # reply to a conversation
    python -m dlm.generate run=... prompt="1+2=" sampler=threshold sampler.threshold=0.8 trajectory=true
    python -m dlm.generate model=llada_8b_instruct prompt="..." device=cuda            # a checkpoint, no run folder

``model=<conf/model option>`` (instead of ``run=``) wraps the model config's checkpoint in ``method=`` (default mdlm)
with its conventions (dlm.run.load_model: tokenizer, mask, shift, default sampler); for a model with a chat template
``prompt=`` is sent as one user message through it (``raw_prompt=true``: as is).

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

``messages=`` (JSON text of ``[{role, content}, ...]``) renders the conversation with ``dlm.data.chat.chat_ids``
(the tokenizer's chat template, else the plain one) and prints the assistant's reply alone, cut before its first
EOS or end-of-turn token (``model.conventions.stop_tokens``): ``python -m dlm.chat`` non-interactively
(dlm/conversation.py).

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from dlm import checks
from dlm.build import build_sampler
from dlm.compile import check_mode, compile_backbone
from dlm.config import CONF_DIR, ConfigError, exit_on_bad_overrides, register_resolvers
from dlm.errors import EXIT_USER_ERROR, UserError, user_errors
from dlm.run import NotARunError
from dlm.run_folder import RunFolder
from dlm.sampling.base import cut_at_eos

# Imports inside functions: the run or HF folder decides what is needed (the AR family, transformers), so
# `--help` and a bad override answer before torch models and transformers load.

register_resolvers()

HOLE = re.compile(r"\[MASK(?::(\d+))?\]")
HOLE_LIKE = re.compile(r"\[\s*mask\b[^\]]*\]?", re.IGNORECASE)  # anything that was meant as a hole
DEFAULT_LENGTH = 32


class GenerateError(UserError):
    """A request the CLI cannot serve; the message says what is supported."""


@dataclass
class GenerationSource:
    """What a request generates from: the family module and its tokenizer, source from a run folder (any family)
    or an HF folder (method=ar); not a training run (that is dlm.run.LoadedRun)."""

    module: Any
    tokenizer: Any
    seq_len: int | None
    sampler_cfg: dict | None  # the run's sampler config (None: the family's default)
    run_dir: Path
    kind: str  # "run" | "hf"


# ---- loading ----------------------------------------------------------------------------------------------------
def _hf_tokenizer(path: Path):
    from dlm.data.tokenizers import HFTokenizer

    if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return HFTokenizer(str(path))
    parent_cfg = RunFolder(path.parent).config
    if parent_cfg.is_file():  # <run>/hf: the run's own tokenizer (e.g. characters, which save no files)
        from dlm.run import load_config

        return instantiate(load_config(path.parent).data.tokenizer)
    raise GenerateError(f"{path} has no tokenizer files and is not inside a run folder: cannot decode its tokens")


def load_hf_folder(path: Path, device: str) -> GenerationSource:
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
    else:  # a plain HF causal LM: the HF backbone under its own (causal) attention
        from dlm.models.hf import HFCausalLM

        backbone = HFCausalLM(pretrained=str(path), attention="causal")
    tokenizer = _hf_tokenizer(path)
    module = AR(backbone, tokenizer, start_token_id=export.get("start_token_id"))
    module.to(device).eval()
    return GenerationSource(module, tokenizer, None, None, path, "hf")


def load_for_generation(path: str | Path, ckpt: str = "last", device: str = "cpu", use_ema: bool = True) -> GenerationSource:
    """A run folder / .ckpt (any family; its EMA weights when it has them and ``use_ema``) or an HF folder
    (method=ar)."""
    from dlm.run import load_run, plain

    p = Path(path).expanduser()
    if p.is_dir() and (p / "config.json").is_file() and not RunFolder(p).is_run():
        return load_hf_folder(p, device)
    run = load_run(p, ckpt=ckpt, device=device, setup_data=False, use_ema=use_ema)
    tokenizer = run.datamodule.tokenizer
    return GenerationSource(run.module, tokenizer, getattr(run.datamodule, "seq_len", None), plain(run.cfg.get("sampler")),
                  run.run_dir, "run")


def load_source(cfg: DictConfig) -> GenerationSource:
    """What the request names: ``model=`` (a checkpoint from its model config, no run folder: dlm.run.load_model),
    else ``run=`` (a run folder, a .ckpt or an HF folder)."""
    if cfg.get("model") is not None:
        from dlm.run import load_requested_model, plain

        run = load_requested_model(device=cfg.get("device", "cpu"))
        return GenerationSource(run.module, run.datamodule.tokenizer, None, plain(run.cfg.get("sampler")), Path.cwd(),
                                "model")
    return load_for_generation(cfg.run, ckpt=cfg.get("ckpt", "last"), device=cfg.get("device", "cpu"),
                               use_ema=bool(cfg.get("use_ema", True)))


def prompt_ids(cfg: DictConfig, source: GenerationSource) -> list[int]:
    """The prompt's token ids: for a model with a chat template (an instruct checkpoint: conventions.chat_template)
    one user message through it (dlm.data.chat.chat_ids, ending where the reply begins), unless raw_prompt=true."""
    from dlm.data.chat import chat_ids
    from dlm.models.capabilities import conventions_of

    text = cfg.get("prompt") or ""
    if not text:
        return []
    if conventions_of(source.module.backbone).chat_template and not cfg.get("raw_prompt"):
        return chat_ids(source.tokenizer, [{"role": "user", "content": text}])
    return source.tokenizer.encode(text)


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


def request_sampler(cfg: DictConfig, source: GenerationSource):
    """The composed sampler (cfg.sampler), else the run's, else None (the family's default); shorthands on top
    (dlm.build.build_sampler)."""
    node = cfg.get("sampler")
    base = OmegaConf.to_container(node, resolve=True) if node is not None else source.sampler_cfg
    overrides = OmegaConf.to_container(cfg.get("sampler_args") or OmegaConf.create({}), resolve=True)
    if base is None:
        if cfg.get("steps") is not None or overrides:
            raise GenerateError("steps / sampler_args need a sampler: choose one with sampler=<name>")
        return None
    sampler = build_sampler(base, cfg.get("steps"), overrides)
    if cfg.get("trajectory") and hasattr(sampler, "record_trajectory"):
        sampler.record_trajectory = True
    if cfg.get("eos_fill") and hasattr(sampler, "eos_id"):
        sampler.eos_id = int(source.tokenizer.eos_token_id)
        sampler.stop_ids = tuple(getattr(source.module, "stop_ids", ()))  # end-of-turn tokens fill the same way
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
    problems = checks.collect(
        checks.run_given(cfg, "a run folder (printed as `run_dir: ...` by python -m dlm.train), a .ckpt inside "
                              "<run>/checkpoints/, or an HF folder written by AR.export_hf"),
        checks.integer(cfg, "num_samples", 1),
        checks.integer(cfg, "length", 1, nullable=True, null_means=": the data's seq_len"),
        checks.integer(cfg, "steps", 1, nullable=True, null_means=": the sampler's own"),
        checks.integer(cfg, "seed", 0, 2**32 - 1),
        checks.boolean(cfg, "use_ema"),
        checks.boolean(cfg, "trajectory"),
        checks.boolean(cfg, "eos_fill"),
        checks.boolean(cfg, "raw_prompt"),
        checks.torch_device(cfg),
    )
    for key in ("prompt", "infill"):  # messages: JSON text or a list (dlm.conversation.parse_messages checks it)
        if cfg.get(key) is not None and not isinstance(cfg.get(key), str):
            problems.append(f"{key}={cfg.get(key)!r} must be text (quote it: {key}='...')")
    if problems:
        raise ConfigError(problems)


@dataclass
class Request:
    """One generation request, ready to run: ``run(generator)`` calls the family's generate or infill."""

    run: Callable[[torch.Generator], Any]
    decode: Callable[[Any], list[str]]  # a Generation -> the text of each sample
    start: Tensor  # the rows before generation (holes and new positions as the mask id): the trajectory's frame 0
    new_tokens: int  # the positions it fills, over all samples


def check_cache_switch(cfg: DictConfig) -> bool | None:
    static_kv_cache = cfg.get("static_kv_cache")
    if static_kv_cache not in (None, True, False):
        raise GenerateError(f"static_kv_cache must be true, false or null (static exactly when compiled), "
                            f"got {static_kv_cache!r}")
    return static_kv_cache


def infill_request(cfg: DictConfig, source: GenerationSource, sampler, n: int) -> Request:
    """Fill the holes of cfg.infill (a template, EOS-padded to ``length``) in n copies."""
    module, tok = source.module, source.tokenizer
    eos, mask_id, length = int(tok.eos_token_id), int(module.mask_id), cfg.get("length")
    ids, fill = parse_template(str(cfg.infill), tok)
    width = int(length) if length is not None else (source.seq_len or len(ids))
    if width > len(ids):
        ids, fill = ids + [eos] * (width - len(ids)), fill + [False] * (width - len(ids))
    tokens = torch.tensor([ids] * n, dtype=torch.long)
    fill_mask = torch.tensor([fill] * n, dtype=torch.bool)

    def decode(gen) -> list[str]:
        return [tok.decode(cut_at_eos(row.tolist(), eos)) for row in gen.tokens.cpu()]

    return Request(lambda generator: module.infill(tokens, fill_mask, sampler=sampler, generator=generator), decode,
                   tokens.masked_fill(fill_mask, mask_id), int(fill_mask.sum()))


def messages_request(cfg: DictConfig, source: GenerationSource, sampler, n: int) -> Request:
    """n assistant replies to the conversation cfg.messages (JSON text or a list of {role, content}), rendered by
    dlm.data.chat.chat_ids with the generation prompt; each text is the reply alone, cut before its first stop token
    (EOS or the model's end-of-turn token: ``module.stop_ids``, dlm/stop_tokens.py)."""
    from dlm.conversation import parse_messages
    from dlm.data.chat import chat_ids

    ids = chat_ids(source.tokenizer, parse_messages(cfg.messages))
    return prompt_request(cfg, source, sampler, n, ids=ids, echo="", stops=getattr(source.module, "stop_ids", None))


def prompt_request(cfg: DictConfig, source: GenerationSource, sampler, n: int, ids: list[int] | None = None,
                   echo: str | None = None, stops: tuple[int, ...] | None = None) -> Request:
    """n continuations of cfg.prompt (empty: unconditional) of ``length`` tokens (default: up to the data's seq_len).
    ``ids``: the prompt's tokens given (not cfg.prompt's), ``echo``: the text printed before each continuation
    (default: the prompt); ``stops``: the tokens a continuation is cut before (default: EOS)."""
    module, tok = source.module, source.tokenizer
    eos, mask_id, length = int(tok.eos_token_id), int(module.mask_id), cfg.get("length")
    prompt_text = (cfg.get("prompt") or "") if echo is None else echo
    if ids is None:
        ids = prompt_ids(cfg, source)
    if length is None:
        length = (source.seq_len - len(ids)) if source.seq_len and source.seq_len > len(ids) else DEFAULT_LENGTH
    length = int(length)
    if length < 1:
        raise GenerateError(f"length must be >= 1, got {length}")
    prompt = torch.tensor([ids] * n, dtype=torch.long) if ids else None
    P = len(ids)
    start = torch.cat([torch.tensor([ids] * n, dtype=torch.long).view(n, P),
                       torch.full((n, length), mask_id, dtype=torch.long)], dim=1)

    def decode(gen) -> list[str]:
        return [prompt_text + tok.decode(cut_at_eos(row[P:].tolist(), stops or (eos,))) for row in gen.tokens.cpu()]

    return Request(lambda generator: module.generate(prompt, length, sampler=sampler, num_samples=n,
                                                     generator=generator), decode, start, n * length)


def timed_run(request: Request, seed: int, device, compile_mode: str | None) -> tuple[Any, float, float | None]:
    """(Generation, seconds, compile seconds): a compiled backbone first runs the same request untimed (compiling
    and capturing CUDA graphs there), so the timed run leaves compilation out."""
    compile_seconds = None
    if compile_mode is not None:
        warm = time.perf_counter()
        request.run(torch.Generator(device=device).manual_seed(seed))
        compile_seconds = time.perf_counter() - warm
    generator = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)
    started = time.perf_counter()
    gen = request.run(generator)
    return gen, time.perf_counter() - started, compile_seconds


def write_trajectory(cfg: DictConfig, source: GenerationSource, request: Request, gen, texts: list[str],
                     sampler_name: str) -> Path:
    """The HTML page of the denoising steps: the family's frames, else rebuilt (AR) or start and end only."""
    from dlm.sampling.trajectory_html import write_trajectory_html

    module, mask_id = source.module, int(source.module.mask_id)
    frames, note = gen.trajectory, ""
    if frames is None and module.one_token_per_call:
        frames = _ar_trajectory(request.start, gen.tokens.cpu(), gen.num_network_calls, mask_id)
        note = "autoregressive: one token per network call"
    elif frames is None:
        frames = [request.start, gen.tokens.cpu()]
        note = f"{type(module).__name__} records no per-step frames: start and end only"
    frames = [f.cpu() for f in frames]
    path = Path(cfg.output) if cfg.get("output") else (
        source.run_dir / "trajectory.html" if source.kind == "run" else Path.cwd() / "trajectory.html")
    meta = f"{source.run_dir} · {type(module).__name__} · {sampler_name} · {gen.num_network_calls} network calls"
    write_trajectory_html(path, frames, source.tokenizer, mask_id, texts, meta=(meta + (" · " + note if note else "")))
    return path


def run_generation(cfg: DictConfig) -> dict[str, Any]:
    """Generate as the config asks; returns texts, network calls, tokens, seconds and the trajectory path."""
    check_request(cfg)
    compile_mode = cfg.get("compile")
    check_mode(compile_mode)  # before loading: a bad mode fails at once
    static_kv_cache = check_cache_switch(cfg)
    source = load_source(cfg)
    module = source.module
    compile_backbone(module.backbone, compile_mode)
    module.static_kv_cache = static_kv_cache
    sampler = request_sampler(cfg, source)
    n = int(cfg.num_samples)  # checked >= 1 (check_request): 0 is refused, never read as 1
    if cfg.get("infill") is not None and cfg.get("prompt") is not None:
        raise GenerateError("give prompt= or infill=, not both")
    if cfg.get("messages") is not None and (cfg.get("prompt") is not None or cfg.get("infill") is not None):
        raise GenerateError("give messages= (a conversation to reply to) or prompt= / infill=, not both")
    make = (messages_request if cfg.get("messages") is not None else
            infill_request if cfg.get("infill") is not None else prompt_request)
    request = make(cfg, source, sampler, n)
    gen, seconds, compile_seconds = timed_run(request, int(cfg.seed), module.compute_device, compile_mode)
    texts = request.decode(gen)
    sampler_name = repr(sampler) if sampler is not None else "the family's default"
    out: dict[str, Any] = {"texts": texts, "network_calls": int(gen.num_network_calls), "tokens": request.new_tokens,
                           "seconds": seconds, "sampler": sampler_name, "trajectory": None, "compile": compile_mode,
                           "compile_seconds": compile_seconds}
    if cfg.get("trajectory"):
        out["trajectory"] = str(write_trajectory(cfg, source, request, gen, texts, sampler_name))
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def hydra_main(cfg: DictConfig) -> None:
    try:
        with user_errors():
            out = run_generation(cfg)
    except (NotARunError, ValueError, NotImplementedError) as err:  # NotImplementedError: e.g. AR cannot infill
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


TEXT_KEYS = ("prompt", "infill", "messages")  # messages: JSON text


def quote_text_overrides(argv: list[str], keys: tuple[str, ...] = TEXT_KEYS) -> list[str]:
    """``prompt=47+8=`` and ``infill=The [MASK:5] sat`` as the shell passes them are not valid Hydra override values
    (``=``, ``[``, spaces); quote them so any text goes through verbatim. Already quoted values are kept."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in keys and not (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):
            arg = f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(arg)
    return out


def main() -> None:
    sys.argv[1:] = quote_text_overrides(sys.argv[1:])
    exit_on_bad_overrides(sys.argv[1:], "generate")  # e.g. sampler=nosuch: one message
    hydra_main()


if __name__ == "__main__":
    main()
