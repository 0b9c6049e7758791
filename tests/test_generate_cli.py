"""`python -m dlm.generate` as a subprocess on a tiny run: prompt, infill template, unconditional, trajectory HTML
(parsed, and rendered in headless Chromium when it is installed), HF-folder (AR export) generation, errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from test_analysis import make_tiny_sweep

from dlm.data.tokenizers import CharTokenizer
from dlm.generate import parse_template, quote_text_overrides
from dlm.sampling.trajectory_html import MASK_GLYPH, render_trajectory_html

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_sweep(tmp_path_factory.getbasetemp()) / "0"


def generate(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlm.generate", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=240)


def body(proc) -> list[str]:
    """The printed texts (possibly empty) and the summary line; Hydra's log lines left out."""
    lines = [ln for ln in proc.stdout.splitlines() if not ln.startswith("[")]
    end = next(i for i, ln in enumerate(lines) if ln.startswith("network calls:"))
    return lines[: end + 1]


def test_template_and_quoting():
    tok = CharTokenizer("0123456789+=")
    ids, fill = parse_template("4[MASK:2]+8=5[MASK]", tok)
    assert len(ids) == 8 and fill == [False, True, True, False, False, False, False, True]
    assert ids[1] == ids[2] == ids[7] == tok.mask_token_id
    with pytest.raises(ValueError, match="no hole"):
        parse_template("4+8=12", tok)
    assert quote_text_overrides(["prompt=47+8=", "run=x", "infill='a'"]) == ["prompt='47+8='", "run=x", "infill='a'"]


def test_prompt_mode(run_dir):
    proc = generate(f"run={run_dir}", "prompt=47+8=", "num_samples=2", "sampler=margin", "steps=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = body(proc)
    assert len(lines) == 3 and all(ln.startswith("47+8=") for ln in lines[:2])
    assert re.search(r"network calls: [1-4] \|", lines[2]) and "MarginSampler" in lines[2]


def test_infill_template_mode_keeps_the_context(run_dir):
    proc = generate(f"run={run_dir}", "infill=4[MASK:1]+8=5[MASK]", "sampler=threshold", "sampler.threshold=0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = body(proc)[0]
    assert re.fullmatch(r"4.\+8=5.?", text) or text.startswith("4"), text  # holes filled (EOS may end it early)
    assert "ThresholdSampler" in body(proc)[-1]


def test_unconditional_with_the_runs_own_sampler(run_dir):
    proc = generate(f"run={run_dir}", "num_samples=3", "length=8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(body(proc)) == 4 and "AncestralSampler" in body(proc)[-1]


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.external, self.ids, self.text, self._stack = [], set(), [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag in ("script", "link", "img") and (attrs.get("src") or attrs.get("href")):
            self.external.append(attrs)
        self._stack.append(tag)

    def handle_endtag(self, tag):
        if self._stack:
            self._stack.pop()

    def handle_data(self, data):
        if "script" not in self._stack and "style" not in self._stack:
            self.text.append(data)


def test_trajectory_html_is_self_contained_and_shows_the_final_text(run_dir, tmp_path):
    out = tmp_path / "t.html"
    proc = generate(f"run={run_dir}", "prompt=12+3", "sampler=entropy", "steps=6", "trajectory=true", f"output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == f"trajectory: {out}"
    final = body(proc)[0]
    page = _Page()
    page.feed(out.read_text(encoding="utf-8"))
    assert not page.external  # inline CSS / JS only
    assert {"frame", "frames", "play", "slider", "final"} <= page.ids
    assert final in "".join(page.text)  # the last frame and the final text, without JavaScript


def test_render_marks_masks():
    tok = CharTokenizer("0123456789+=")
    m = tok.mask_token_id
    frames = [torch.tensor([[1, m, m]]), torch.tensor([[1, 2, m]]), torch.tensor([[1, 2, tok.eos_token_id]])]
    html = render_trajectory_html(frames, tok, m, ["12"])
    assert MASK_GLYPH in html and "<pre>12</pre>" in html and "step 2 / 2" in html


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_trajectory_renders_in_headless_chromium(run_dir, tmp_path):
    out = tmp_path / "t.html"
    proc = generate(f"run={run_dir}", "prompt=3+4=", "num_samples=2", "sampler=random_order", "steps=5",
                    "trajectory=true", f"output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    finals = body(proc)[:2]
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=2000",
                          "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=60).stdout
    assert 'id="controls"' in dom and 'id="controls" hidden' not in dom  # the script ran and showed the controls
    frame = dom.split('id="frame"', 1)[1].split("</section>", 1)[0]
    rendered = re.sub(r"<[^>]+>", "", frame.split('<section id="final"', 1)[0])
    for text in finals:
        assert text in rendered  # the frame the script drew is the final one
    assert "step 5 / 5" in dom or re.search(r"step (\d+) / \1", dom)


def test_ar_export_folder_generates_and_refuses_infill(tmp_path):
    from dlm.methods.ar import AR
    from dlm.models.transformer import Transformer

    tok = CharTokenizer("0123456789+=")
    module = AR(Transformer(vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2, max_seq_len=32), tok)
    run = tmp_path / "run"
    module.export_hf(run / "hf")
    (run / ".hydra").mkdir(parents=True)  # the run folder around the export holds the tokenizer's config
    (run / ".hydra" / "config.yaml").write_text(
        "data:\n  tokenizer:\n    _target_: dlm.data.tokenizers.CharTokenizer\n    alphabet: '0123456789+='\n")
    proc = generate(f"run={run / 'hf'}", "prompt=1+1=", "length=4", "trajectory=true", f"output={tmp_path / 'a.html'}",
                    "+sampler_args.temperature=0", "sampler=ar")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert body(proc)[0].startswith("1+1=") and "network calls:" in body(proc)[-1]
    assert (tmp_path / "a.html").is_file()
    static = generate(f"run={run / 'hf'}", "prompt=1+1=", "length=4", "+sampler_args.temperature=0", "sampler=ar",
                      "static_kv_cache=true")  # a preallocated KV cache (dlm/models/kv_cache.py): the same text
    assert static.returncode == 0, static.stderr[-2000:]
    assert body(static)[0] == body(proc)[0]
    bad = generate(f"run={run / 'hf'}", "prompt=1", "static_kv_cache=maybe")
    assert bad.returncode == 2 and "static_kv_cache must be true, false or null" in bad.stderr
    proc = generate(f"run={run / 'hf'}", "infill=1[MASK]1=2")
    assert proc.returncode == 2 and "cannot infill" in proc.stderr


def test_a_plain_hf_causal_folder_generates_through_the_hf_backbone(tmp_path):
    from omegaconf import OmegaConf
    from transformers import GPT2Config, GPT2LMHeadModel

    from dlm.generate import load_for_generation, run_generation
    from dlm.models.hf import HFCausalLM

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=24, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    run = tmp_path / "run"
    hf.save_pretrained(run / "hf")
    (run / ".hydra").mkdir(parents=True)  # the run folder around the folder holds the tokenizer's config
    (run / ".hydra" / "config.yaml").write_text(
        "data:\n  tokenizer:\n    _target_: dlm.data.tokenizers.CharTokenizer\n    alphabet: '0123456789+='\n")
    source = load_for_generation(run / "hf")
    assert isinstance(source.module.backbone, HFCausalLM) and source.kind == "hf"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():  # the same logits as the HF model's own causal forward
        torch.testing.assert_close(source.module.backbone(ids, attention="causal").float(), hf(ids).logits)
    cfg = OmegaConf.create({"run": str(run / "hf"), "prompt": "1+1=", "length": 4, "num_samples": 1, "seed": 0,
                            "sampler": {"_target_": "dlm.sampling.autoregressive.ARSampler", "temperature": 0.0}})
    out = run_generation(cfg)
    assert out["texts"][0].startswith("1+1=") and out["network_calls"] >= 1


def test_errors_are_one_line(tmp_path):
    proc = generate(f"run={tmp_path}", "prompt=1")
    assert proc.returncode == 2 and "not a run folder" in proc.stderr
