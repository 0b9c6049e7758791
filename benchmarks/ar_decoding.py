"""AR decoding through dlm (``method=ar``) against Hugging Face ``generate`` on the same weights, in one process.

The issue's figure to beat is what a practitioner runs for AR: HF ``generate`` with a static KV cache and
``torch.compile``. This benchmark runs it beside dlm's AR family on one random-init Qwen3-shaped model (the same
weights loaded twice from a temporary folder: transformers' own model for ``generate``, dlm's ``HFCausalLM`` for
``AR.generate``), greedy, fixed length, and prints tokens/s and each row's ratio against plain HF ``generate``:

    hf generate                    DynamicCache, eager (transformers' default)
    hf generate static+compile     cache_implementation="static" + torch.compile (transformers' auto-compile)
    dlm ar                         growing KV cache, eager (dlm's default without compile=)
    dlm ar static                  static KV cache, eager (what the static cache costs by itself)
    dlm ar compile=MODE            compile_backbone(MODE): static KV cache, two graphs (prompt, step)

Both sides decode the same tokens: HF gets ``[start, prompt]`` (dlm's AR prepends its start token, here the EOS
id), the mask token is suppressed on the HF side as dlm never predicts it, and the EOS row of the (tied) embedding
is zeroed so that EOS never wins the argmax and no row stops early. The ``same tokens`` column checks it.

Timing: each row runs once untimed (compilation, CUDA-graph capture), then ``--repeats`` timed calls; the fastest
counts. Compiled rows compile in their own warm-up; ``torch._dynamo`` is reset between the HF and dlm compiled rows.

Usage: python benchmarks/ar_decoding.py [--batches 1,8] [--prompt 32] [--gen 64] [--mode default] [--threads 2]
       [--repeats 3] [--tiny] [--eager] [--out results.json]
       GPU: python benchmarks/ar_decoding.py --device cuda --qwen06b --batches 1,16 --prompt 64 --gen 256
       --mode reduce-overhead --dtype bfloat16   (the stock baseline's geometry; ../shared/device/README.md)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = dict(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            tie_word_embeddings=True)
SMALL = dict(model_type="qwen3", vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=1024,
             tie_word_embeddings=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_model(config: dict, dtype: torch.dtype, folder: Path, eos: int) -> None:
    """A random-init causal LM written with save_pretrained; the EOS row zeroed (its logit is 0: never the argmax)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k != "model_type"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields), dtype=dtype)
    with torch.no_grad():
        model.get_input_embeddings().weight[eos].zero_()
        model.get_output_embeddings().weight[eos].zero_()
    model.save_pretrained(folder)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    """(fastest seconds of ``repeats`` calls after one untimed call, the last output)."""
    with torch.no_grad():
        out = fn()
        sync(device)
        best = float("inf")
        for _ in range(repeats):
            step = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
            if step is not None and device.type == "cuda":
                step()  # a new generate call: outputs of the previous one are dead (CUDA graphs)
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--mode", default="default", help="torch.compile mode of the compiled rows (both sides)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--qwen06b", action="store_true", help="the Qwen3-0.6B geometry (default: a small Qwen3)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer d=64 model (smoke runs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--eager", action="store_true", help="skip the compiled rows (no torch.compile warm-up)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)

    from transformers import AutoModelForCausalLM, CompileConfig

    from dlm.compile import compile_backbone
    from dlm.methods.ar import AR
    from dlm.models.hf import HFCausalLM
    from dlm.models.hf_geometry import QWEN3_0P6B
    from dlm.sampling.autoregressive import ARSampler

    config = dict(QWEN3_0P6B, max_position_embeddings=4096) if a.qwen06b else dict(TINY if a.tiny else SMALL)
    V = config["vocab_size"]
    tok = SimpleNamespace(vocab_size=V, pad_token_id=V - 3, eos_token_id=V - 2, mask_token_id=V - 1)
    batches = [int(b) for b in a.batches.split(",")]
    g = torch.Generator().manual_seed(0)
    prompts = {B: torch.randint(0, V - 3, (B, a.prompt), generator=g).to(device) for B in batches}
    results: dict = {"shape": {"prompt": a.prompt, "gen": a.gen, "dtype": a.dtype, "mode": a.mode, "device": a.device,
                               "threads": a.threads, "config": config}, "rows": {}}

    with tempfile.TemporaryDirectory(prefix="dlm-ar-bench-") as tmp:
        save_model(config, dtype, Path(tmp), tok.eos_token_id)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        ar = AR(HFCausalLM(pretrained=tmp, torch_dtype=a.dtype, attention="causal"), tok).to(device).eval()
    greedy = ARSampler(temperature=0.0)
    compile_config = CompileConfig(mode=a.mode)
    compile_config._compile_all_devices = True  # transformers auto-compiles on accelerators only otherwise

    def hf_row(B: int, static: bool):
        x = torch.cat([torch.full((B, 1), tok.eos_token_id, device=device), prompts[B]], dim=1)
        kwargs = dict(cache_implementation="static", compile_config=compile_config) if static else {}
        return lambda: hf.generate(x, max_new_tokens=a.gen, min_new_tokens=a.gen, do_sample=False,
                                   pad_token_id=tok.pad_token_id, suppress_tokens=[tok.mask_token_id],
                                   **kwargs)[:, x.shape[1]:]

    def dlm_row(B: int):
        return lambda: ar.generate(prompts[B], a.gen, sampler=greedy).tokens[:, a.prompt:]

    rows = [("hf generate", lambda B: hf_row(B, False), None),
            ("hf generate static+compile", lambda B: hf_row(B, True), None),
            ("dlm ar", dlm_row, False),
            ("dlm ar static", dlm_row, True),
            (f"dlm ar compile={a.mode}", dlm_row, None)]
    if a.eager:
        rows = [row for row in rows if "compile" not in row[0]]
    for name, make, static in rows:
        if name.startswith("dlm ar compile"):
            torch._dynamo.reset()
            compile_backbone(ar.backbone, a.mode)
        ar.static_kv_cache = static
        for B in batches:
            seconds, tokens = timed(make(B), device, a.repeats)
            results["rows"][f"{name}/B{B}"] = {"tokens_per_s": B * a.gen / seconds, "seconds": seconds,
                                               "tokens": tokens.cpu()}

    geometry = "Qwen3-0.6B" if a.qwen06b else "tiny Qwen3" if a.tiny else "small Qwen3"
    print(f"AR decoding, {geometry} geometry ({sum(q.numel() for q in hf.parameters()) / 1e6:.1f}M "
          f"params, {a.dtype}) on {device}, {a.threads} threads | prompt {a.prompt} + {a.gen} new tokens, greedy | "
          f"best of {a.repeats}")
    head = f"{'':28s}" + "".join(f"{'tok/s B' + str(B):>13s} {'x hf':>6s}" for B in batches) + f" {'same tokens':>12s}"
    print(head)
    print("-" * len(head))
    for name, _, _ in rows:
        line = f"{name:28s}"
        same = True
        for B in batches:
            r, base = results["rows"][f"{name}/B{B}"], results["rows"][f"hf generate/B{B}"]
            r["x_hf_generate"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["same_tokens"] = bool(torch.equal(r["tokens"], base["tokens"]))
            same &= r["same_tokens"]
            line += f"{r['tokens_per_s']:13.1f} {r['x_hf_generate']:6.2f}"
        print(line + f" {'yes' if same else 'NO':>12s}")
    for r in results["rows"].values():
        r.pop("tokens")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
