"""Generation speed of dlm's samplers on a Qwen3-0.6B-shaped model, beside the stock GPU baselines.

    python3 benchmarks/gpu_generation.py                   # GPU: eager, then backbone.compile(mode="reduce-overhead")
    python3 benchmarks/gpu_generation.py --compile eager   # or a list: eager,default,reduce-overhead,cudagraphs
    python3 benchmarks/gpu_generation.py --tiny            # tiny geometry: the whole script on CPU in seconds
    python3 benchmarks/gpu_generation.py --report DIR      # the table only, from DIR/gpu_generation.json, beside the
                                                           # stock baselines rerun in the same device call
                                                           # (DIR/gpu_baseline.json, DIR/ar_baseline.json)

benchmarks/gpu_all.sh runs it (and the stock baselines) in one device call; see the top of that script.

The model: dlm's ``HFCausalLM`` around an HF Qwen3 built from the Qwen3-0.6B geometry (28 layers, d=1024, 16/8
heads of 128, FFN 3072, vocab 151936, tied embeddings), random init, bf16, SDPA, bidirectional by default. One
backbone is shared by the three families timed on it (MDLM, BD3-LM and AR each pass their own attention
pattern), so one ``backbone.compile`` covers all of them. Prompt 64 random tokens, 256 new tokens, batch 1 and
16 (``--tiny``: a 2-layer d=64 model, prompt 16, 32 new tokens, blocks of 8, as the stock scripts' ``--tiny``).
Every variant runs through dlm's public ``module.generate(prompt, length, sampler=...)``:

======================= =================================================================================
``naive_256``           MDLM, ``ConfidenceSampler(steps=256)``: a full forward per step, one token per step
``naive_64``            the same at 64 steps (4 tokens per step)
``semi_ar_b32``         MDLM, ``LowConfidenceSampler(steps=64, block_length=32)``: LLaDA's semi-AR blocks
``bd3lm_b32``           BD3-LM (``block_size=32``), its exact KV cache over finished blocks,
                        ``LowConfidenceSampler(steps=8)`` per block: 64 denoiser calls over 32 tokens, plus
                        one cache append per prompt block and per finished block
``threshold_cache_b32`` MDLM, ``ThresholdSampler(threshold=1.0, steps=64, block_length=32, kv_cache="prefix")``:
                        Fast-dLLM's prefix KV cache (a full forward per block, suffix-only forwards between)
``dual_cache_b32``      the same with ``kv_cache="dual"``: Fast-dLLM's DualCache (forwards over the block only)
``ar_kvcache``          dlm's AR family (``method=ar``): greedy, one token per forward through its KV cache
======================= =================================================================================

Fixed step counts only. A random-init model has meaningless confidences, so an adaptive sampler would time a
degenerate run (the threshold sampler at tau=0.9 would commit one token per step, no probability coming near
0.9; entropy-bounded likewise). ``threshold=1.0`` never fires (a probability cannot exceed 1), so the threshold
sampler commits exactly the even split of ``steps``, 4 tokens per call: ``threshold_cache_b32`` is the
``semi_ar_b32`` schedule plus the prefix cache, and its gain over that row is the cache's. Greedy throughout.
The EOS row of the (tied) embedding is zeroed so that EOS is never the argmax (its logit is 0; the largest of
151,935 random logits is far above): the AR and BD3-LM loops stop once every row has emitted EOS, and the
timing must cover all 256 tokens (the calls are checked: an early stop is an error).

Timing: per variant and batch, warm-up first (eager: one call with few steps, touching every shape the timed
call uses; compiled: two calls covering every shape, so that compilation and CUDA-graph recording happen
before timing), recorded as ``warmup_s``; then ``--repeats`` timed calls (the fastest counts) between
``torch.cuda.synchronize()``. A run during whose timed calls Dynamo still compiled graphs says so
(``graphs_compiled_while_timed``: raise ``--repeats``). Reported: generated tokens/s (B x 256 / seconds), ms per
network call (a batched forward counts once), the calls, peak memory, and one forward over the whole sequence
per batch (``forward_ms``: the floor of a diffusion step). The table gives ratios against dlm's own eager
``naive_256`` at the same batch (this process) and against the stock figures of ``../shared/device/README.md``
(H200, 2026-11-27), or with ``--report`` against the stock baselines rerun in the same device call.

Compilation: ``--compile MODE[,MODE...]`` (default ``eager,reduce-overhead`` on CUDA, ``eager`` elsewhere) calls
``module.backbone.compile(mode=MODE)`` (``nn.Module.compile``, in place) before that mode's runs;
``cudagraphs`` means ``backend="cudagraphs"`` (CUDA graphs without Inductor: seconds to compile, not minutes).
Every call is compiled: the KV-cache variants (ar_kvcache, bd3lm_b32, threshold/dual_cache_b32) decode through a static
(preallocated) cache, as dlm's own ``compile=`` option does (``DiffusionLM.static_kv_cache`` null: static exactly
when compiled; :mod:`dlm.models.kv_cache`), so every call has fixed shapes and CUDA graphs replay them (the
recompile limit is raised to 64 all the same). ``--kv-eager`` instead keeps growing caches
(``static_kv_cache=False``) and runs their calls eagerly, the behaviour before static caches.

Every (mode, variant, batch) is guarded: a failure is recorded as an error string and the rest still run.
``--budget-s`` stops starting new runs after that many seconds (the rest are recorded as skipped), and the JSON
(``$OUT/gpu_generation.json`` or ``--out``) is rewritten after every run, so a ``timeout`` kill keeps what ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlm.compile import uses_kv_cache  # noqa: E402

# ../shared/device/README.md (gpu_baseline.py, ar_generate_baseline.py), NVIDIA H200, 2026-11-27; tok/s by batch.
STOCK = {
    "hf_static_compiled": {1: 268, 16: 3953},  # HF generate, static KV cache + torch.compile: the AR target
    "hf_dynamic": {1: 15, 16: 247},  # HF generate, dynamic KV cache (ar_generate_baseline.py, per the issue)
    "hf_kvcache": {1: 11, 16: 153},  # HF generate with KV cache (gpu_baseline.py --only sample)
    "naive_256": {1: 18, 16: 303},  # naive masked diffusion, full forward per step, 256 steps
    "naive_64": {1: 67, 16: 1412},  # the same, 64 steps
    "full_forward_B1_ms": 24.8,  # one eager forward over 320 tokens at batch 1
}
# The stock row each variant is comparable with (same kind of decoding).
STOCK_ROW = {"naive_256": "naive_256", "naive_64": "naive_64", "ar_kvcache": "hf_static_compiled"}

TINY = dict(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            tie_word_embeddings=True)


def qwen3_0p6b() -> dict:
    from dlm.models.hf_geometry import QWEN3_0P6B

    return dict(QWEN3_0P6B, max_position_embeddings=4096)  # the stock baselines' context; no effect on speed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_modules(tiny: bool, device: torch.device, block: int, kv_eager: bool = False) -> tuple[dict, int]:
    """MDLM, BD3-LM and AR modules sharing one bf16 HFCausalLM backbone; returns (modules, vocab size)."""
    from dlm.methods.ar import AR
    from dlm.methods.bd3lm import BD3LM
    from dlm.methods.mdlm import MDLM
    from dlm.models.hf import HFCausalLM
    from dlm.schedules import LinearSchedule

    config = dict(TINY) if tiny else qwen3_0p6b()
    V = config["vocab_size"]
    torch.manual_seed(0)
    with torch.device(device):  # random init where the model runs (0.6B on the host takes seconds)
        backbone = HFCausalLM(config=config, torch_dtype="bfloat16", attn_implementation="sdpa")
    backbone.to(device).eval()
    tok = SimpleNamespace(vocab_size=V, pad_token_id=V - 3, eos_token_id=V - 2, mask_token_id=V - 1)
    with torch.no_grad():  # EOS never wins the argmax (tied embedding: its logit is 0), see the docstring
        backbone.hf_model.get_input_embeddings().weight[tok.eos_token_id].zero_()
        out = backbone.hf_model.get_output_embeddings()
        if out is not None:
            out.weight[tok.eos_token_id].zero_()
    modules = {
        "mdlm": MDLM(backbone, tok, LinearSchedule()),
        "bd3lm": BD3LM(backbone, tok, LinearSchedule(), block_size=block),
        "ar": AR(backbone, tok, start_token_id=0),
    }
    for m in modules.values():
        m.static_kv_cache = False if kv_eager else None  # None: a static KV cache exactly when compiled
        m.to(device).eval()
    return modules, V


def variants(gen: int, block: int) -> dict[str, tuple[str, object]]:
    """name -> (family, make_sampler(warm)). A warm sampler touches every shape of the timed call in fewer steps."""
    from dlm.sampling import ARSampler, ConfidenceSampler, LowConfidenceSampler, ThresholdSampler

    fast = gen // 4
    nblocks = -(-gen // block)
    per_block = max(1, fast // nblocks)
    return {
        "naive_256": ("mdlm", lambda warm: ConfidenceSampler(steps=2 if warm else gen, temperature=0.0)),
        "naive_64": ("mdlm", lambda warm: ConfidenceSampler(steps=2 if warm else fast, temperature=0.0)),
        "semi_ar_b32": ("mdlm", lambda warm: LowConfidenceSampler(
            steps=nblocks if warm else fast, temperature=0.0, block_length=block)),
        "bd3lm_b32": ("bd3lm", lambda warm: LowConfidenceSampler(
            steps=min(2, per_block) if warm else per_block, temperature=0.0)),
        "threshold_cache_b32": ("mdlm", lambda warm: ThresholdSampler(
            threshold=1.0, steps=min(2 * nblocks, fast) if warm else fast, temperature=0.0, block_length=block,
            kv_cache="prefix")),
        "dual_cache_b32": ("mdlm", lambda warm: ThresholdSampler(
            threshold=1.0, steps=min(2 * nblocks, fast) if warm else fast, temperature=0.0, block_length=block,
            kv_cache="dual")),
        "ar_kvcache": ("ar", lambda warm: ARSampler(temperature=0.0)),
    }


def expected_calls(name: str, gen: int, block: int, prompt: int) -> int:
    """Network calls of the timed call (a check that nothing stopped early)."""
    fast, nblocks = gen // 4, -(-gen // block)
    return {
        "naive_256": gen, "naive_64": fast, "semi_ar_b32": fast, "threshold_cache_b32": fast, "dual_cache_b32": fast,
        # denoiser calls + one append per prompt block and per finished block but the last
        "bd3lm_b32": fast + prompt // block + nblocks - 1,
        "ar_kvcache": gen,
    }[name]


def compile_backbone(backbone: torch.nn.Module, mode: str, kv_eager: bool = False) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    backbone._compiled_call_impl = None  # undo an earlier nn.Module.compile
    for key in ("recompile_limit", "cache_size_limit"):  # shapes differ per variant/batch: more than 8 graphs
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 64)
    if mode == "cudagraphs":
        backbone.compile(backend="cudagraphs")
    else:
        backbone.compile(mode=mode)
    if kv_eager:  # as dlm.compile does: calls that read or fill a KV cache run eagerly (shapes change per call)
        compiled, eager = backbone._compiled_call_impl, backbone._call_impl

        def call(*args, **kwargs):
            return eager(*args, **kwargs) if uses_kv_cache(kwargs) else compiled(*args, **kwargs)

        backbone._compiled_call_impl = call


def run_one(module, family: str, make_sampler, prompt: torch.Tensor, gen: int, compiled: bool, repeats: int,
            want_calls: int, device: torch.device) -> dict:
    warm_len = gen if (family == "ar" and compiled) else min(gen, 8) if family == "ar" else gen
    t0 = time.perf_counter()
    step = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if compiled else None
    with torch.no_grad():
        for _ in range(2 if compiled else 1):
            if step is not None:  # CUDA graphs: a new generate call is a new step (earlier outputs are dead)
                step()
            module.generate(prompt, warm_len, sampler=make_sampler(True))
        sync(device)
        warm = time.perf_counter() - t0
        graphs = _graphs()
        best, out = float("inf"), None
        for _ in range(repeats):
            sampler = make_sampler(False)
            if step is not None:
                step()
            sync(device)
            t = time.perf_counter()
            out = module.generate(prompt, gen, sampler=sampler)
            sync(device)
            best = min(best, time.perf_counter() - t)
    graphs = _graphs() - graphs
    B = prompt.shape[0]
    mask_id = getattr(module, "mask_id", -1)
    if out.tokens.shape != (B, prompt.shape[1] + gen) or bool((out.tokens == mask_id).any()):
        raise RuntimeError(f"bad output: shape {tuple(out.tokens.shape)}, masks left: {int((out.tokens == mask_id).sum())}")
    if out.num_network_calls != want_calls:
        raise RuntimeError(f"{out.num_network_calls} network calls, expected {want_calls} (stopped early?)")
    return {"tok_per_s": round(B * gen / best, 2), "ms_per_call": round(best * 1000 / out.num_network_calls, 3),
            "calls": out.num_network_calls, "seconds": round(best, 4), "warmup_s": round(warm, 2),
            **({"graphs_compiled_while_timed": graphs} if graphs else {})}


def _graphs() -> int:
    """Graphs Dynamo has compiled so far in this process (a compile inside a timed call spoils its figure)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a counter renamed in another torch
        return 0


def forward_ms(backbone, V: int, B: int, T: int, device: torch.device, reps: int) -> float:
    x = torch.randint(0, V - 3, (B, T), device=device)
    with torch.no_grad():
        for _ in range(3):
            backbone(x)
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            backbone(x)
        sync(device)
    return round((time.perf_counter() - t) / reps * 1000, 3)


def write(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny geometry (CPU smoke run)")
    p.add_argument("--compile", default=None,
                   help="comma-separated modes: eager, default, reduce-overhead, max-autotune, cudagraphs "
                        "(default: eager,reduce-overhead on CUDA, eager elsewhere)")
    p.add_argument("--kv-eager", action="store_true",
                   help="compiled modes: growing KV caches, their calls run eagerly (default: static caches, compiled)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--variants", default=None, help="comma-separated subset (default: all, in the table's order)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per run (the fastest counts)")
    p.add_argument("--budget-s", type=float, default=0.0, help="start no new run after this many seconds (0: none)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_generation.json or ./gpu_generation.json)")
    p.add_argument("--report", default=None, metavar="DIR", help="print the table from DIR's JSONs only")
    a = p.parse_args(argv)
    if a.report:
        return report(Path(a.report))

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modes = (a.compile or ("eager,reduce-overhead" if device.type == "cuda" else "eager")).split(",")
    batches = [int(b) for b in a.batches.split(",")]
    prompt_len, gen, block = (16, 32, 8) if a.tiny else (64, 256, 32)
    out_path = Path(a.out or Path(os.environ.get("OUT", ".")) / "gpu_generation.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    start = time.monotonic()

    modules, V = build_modules(a.tiny, device, block, a.kv_eager)
    backbone = modules["mdlm"].backbone
    table = variants(gen, block)
    names = a.variants.split(",") if a.variants else list(table)
    env = {"torch": torch.__version__, "device": str(device), "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    results = {"shape": {"prompt": prompt_len, "gen": gen, "block": block, "batches": batches, "tiny": a.tiny,
                         "kv_eager": a.kv_eager,
                         "params_M": round(sum(q.numel() for q in backbone.parameters()) / 1e6, 1)},
               "env": env, "modes": modes, "variants": names, "stock_h200": STOCK, "runs": {}, "forward_ms": {}}
    g = torch.Generator(device="cpu").manual_seed(0)
    prompts = {B: torch.randint(0, V - 3, (B, prompt_len), generator=g).to(device) for B in batches}

    write(out_path, results)  # from the start: a part killed early still leaves its settings
    for mode in modes:
        compiled = mode != "eager"
        if compiled:
            try:
                compile_backbone(backbone, mode, a.kv_eager)
            except Exception as e:  # noqa: BLE001 - report it, run the rest
                traceback.print_exc()
                for name in names:
                    for B in batches:
                        results["runs"][f"{mode}/{name}/B{B}"] = {"error": f"compile: {type(e).__name__}: {str(e)[:300]}"}
                write(out_path, results)
                continue
        for B in batches:  # one forward of the whole sequence: the floor of a diffusion step
            if a.budget_s and time.monotonic() - start > a.budget_s:
                results["forward_ms"][f"{mode}/B{B}"] = "skipped: budget"
                continue
            try:
                results["forward_ms"][f"{mode}/B{B}"] = forward_ms(backbone, V, B, prompt_len + gen, device,
                                                                   reps=10 if device.type == "cuda" else 3)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                results["forward_ms"][f"{mode}/B{B}"] = f"{type(e).__name__}: {str(e)[:300]}"
        for name in names:
            family, make_sampler = table[name]
            for B in batches:
                key = f"{mode}/{name}/B{B}"
                if a.budget_s and time.monotonic() - start > a.budget_s:
                    results["runs"][key] = {"error": f"skipped: budget of {a.budget_s:g} s spent"}
                    print(f"{key:40s} skipped (budget)", flush=True)
                    continue
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    r = run_one(modules[family], family, make_sampler, prompts[B], gen, compiled, a.repeats,
                                expected_calls(name, gen, block, prompt_len), device)
                except Exception as e:  # noqa: BLE001 - one failure must not stop the rest
                    traceback.print_exc()
                    r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if device.type == "cuda":
                    r["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
                results["runs"][key] = r
                print(f"{key:40s} {json.dumps(r)}", flush=True)
                write(out_path, results)
    results["seconds"] = round(time.monotonic() - start, 1)
    write(out_path, results)
    print_table(results)
    print(f"wrote {out_path}")
    return results


def _fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else format("-", ">" + spec.split(".")[0])


def print_table(results: dict, same_call: dict | None = None) -> None:
    """The runs with ratios against this process's eager naive_256 and against the stock figures: the H200
    numbers of the README, or, given ``same_call`` (tok/s by stock row and batch), the rerun in this call."""
    stock = same_call or STOCK
    label = "same-call" if same_call else "stock H200"
    runs = results["runs"]
    sh = results["shape"]
    print(f"\nprompt {sh['prompt']} + {sh['gen']} new tokens, blocks of {sh['block']}, {sh.get('params_M')}M "
          f"parameters, {results['env'].get('gpu') or results['env'].get('device')}; stock = {label}")
    head = (f"{'mode':16s} {'variant':20s} {'B':>3s} {'tok/s':>9s} {'ms/call':>8s} {'calls':>5s} "
            f"{'x naive256':>10s} {'stock':>7s} {'x stock':>7s} {'x AR target':>11s}")
    print(head)
    print("-" * len(head))
    for key, r in runs.items():
        mode, name, b = key.split("/")
        B = int(b[1:])
        tps = r.get("tok_per_s")
        if tps is None:
            print(f"{mode:16s} {name:20s} {B:3d}  {r.get('error', '?')[:90]}")
            continue
        naive = runs.get(f"eager/naive_256/B{B}", {}).get("tok_per_s")
        ref = stock.get(STOCK_ROW.get(name, ""), {}).get(B)
        target = stock.get("hf_static_compiled", {}).get(B)
        print(f"{mode:16s} {name:20s} {B:3d} {tps:9.1f} {r['ms_per_call']:8.2f} {r['calls']:5d} "
              f"{_fmt(naive and tps / naive, '10.2f')} {_fmt(ref, '7.0f')} {_fmt(ref and tps / ref, '7.2f')} "
              f"{_fmt(target and tps / target, '11.3f')}")
    fwd = results.get("forward_ms", {})
    if fwd:
        ref = stock.get("full_forward_B1_ms")
        print("one forward over the whole sequence (ms): " + ", ".join(f"{k} {v}" for k, v in fwd.items())
              + (f"; {label} HF eager B1: {ref}" if ref else ""))
    print(f"stock: naive_* -> the naive sampler of gpu_baseline.py; ar_kvcache -> HF generate with a static "
          f"cache + torch.compile (x AR target: the same, for every row); {label} HF generate dynamic cache: "
          f"{stock.get('hf_dynamic')}, gpu_baseline's HF generate: {stock.get('hf_kvcache')}")


def report(folder: Path) -> dict:
    """The table of folder/gpu_generation.json with the stock baselines rerun in the same device call."""
    results = json.loads((folder / "gpu_generation.json").read_text())
    batches = results["shape"]["batches"]
    same: dict = {}
    try:
        sample = json.loads((folder / "gpu_baseline.json").read_text()).get("sample", {})
        gen = results["shape"]["gen"]
        for B in batches:
            for steps, row in ((gen, "naive_256"), (gen // 4, "naive_64")):
                v = sample.get(f"dlm_naive_B{B}_steps{steps}_tok_per_s")
                if v is not None:
                    same.setdefault(row, {})[B] = v
            v = sample.get(f"ar_kvcache_B{B}_tok_per_s")
            if v is not None:
                same.setdefault("hf_kvcache", {})[B] = v
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"no same-call gpu_baseline.json: {e}")
    try:
        ar = json.loads((folder / "ar_baseline.json").read_text())
        for B in batches:
            for key, row in ((f"hf_static_compiled_B{B}_tok_per_s", "hf_static_compiled"),
                             (f"hf_dynamic_B{B}_tok_per_s", "hf_dynamic")):
                if isinstance(ar.get(key), (int, float)):
                    same.setdefault(row, {})[B] = ar[key]
        if "full_forward_B1_ms" in ar:
            same["full_forward_B1_ms"] = ar["full_forward_B1_ms"]
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"no same-call ar_baseline.json: {e}")
    print_table(results, same or None)
    if same:
        print("\n(and against the README's H200 figures)")
        print_table(results)
    results["same_call_stock"] = {k: v for k, v in same.items()}
    return results


if __name__ == "__main__":
    main()
