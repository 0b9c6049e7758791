"""Talking to a model: the chat loop (python -m dlm.chat) driven by a fake stdin, the per-step observer
(Sampler.on_step) that its live view uses, `python -m dlm.generate messages=...`, and (slow) the chat CLI in a real
terminal through tmux."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose, run_dir_of

from dlm.chat import ChatSession, LiveView, Settings, chat_loop, printable
from dlm.config import ConfigError
from dlm.conversation import (
    ChatModel,
    ConversationTooLong,
    chat_sampler,
    fit_history,
    generate_reply,
    load_chat_model,
    parse_messages,
    render_partial,
)
from dlm.data.chat import ChatError, chat_ids
from dlm.data.tokenizers import ByteTokenizer
from dlm.sampling.base import Generation

# The embedded arithmetic data under a byte tokenizer: the plain chat template's "user: " needs letters.
BYTES = ["data=arithmetic", "data.tokenizer._target_=dlm.data.tokenizers.ByteTokenizer", "~data.tokenizer.alphabet",
         "data.seq_len=32"]
TINY = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "data.batch_size=8",
        "data.source.num_train=64", "data.source.num_val=16", "samples.num_unconditional=1",
        "samples.num_prompted=1", "samples.num_infill=1", "sampler.steps=4", "logger=none"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 2-step MDLM run on byte-tokenized arithmetic, trained in this process once for the file."""
    from dlm.train import main

    base = tmp_path_factory.mktemp("chat_run")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["dlm.train", *BYTES, *TINY, f"paths.output_root={base / 'runs'}",
                                 f"paths.cache_dir={base / 'cache'}", "name=chat"])
        mp.setattr(sys, "stdout", out)
        try:
            main()
        except SystemExit as exit_:
            assert not exit_.code, out.getvalue()[-2000:]
    return run_dir_of(out.getvalue())


@pytest.fixture(scope="module")
def model(tiny_run) -> ChatModel:
    return load_chat_model(tiny_run)


def session_of(model, **settings) -> ChatSession:
    values = {"steps": None, "temperature": None, "block_length": None, "max_new_tokens": 8, **settings}
    return ChatSession(model, Settings(**values), seed=0)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---- the chat loop -----------------------------------------------------------------------------------------------
def test_the_history_grows_reset_clears_and_eof_exits_0(model, monkeypatch):
    prompts = []
    real = model.module.generate

    def spy(prompt, length, **kwargs):
        prompts.append(prompt[0].tolist())
        return real(prompt, length, **kwargs)

    monkeypatch.setattr(model.module, "generate", spy)
    session = session_of(model)
    out = io.StringIO()
    code = chat_loop(session, io.StringIO("12+3=\n4+5=\n/reset\n7+1=\n"), out)  # then EOF
    assert code == 0
    text = out.getvalue()
    assert len(prompts) == 3
    # turn 2 is rendered after turn 1 and its reply; after /reset the conversation starts over
    tok = model.tokenizer
    assert prompts[0] == chat_ids(tok, [{"role": "user", "content": "12+3="}])
    assert prompts[1][: len(prompts[0])] == prompts[0] and len(prompts[1]) > len(prompts[0])
    assert prompts[2] == chat_ids(tok, [{"role": "user", "content": "7+1="}])
    assert [m["content"] for m in session.history] == ["7+1=", session.history[1]["content"]]
    assert "(conversation cleared)" in text
    stats = [ln for ln in text.splitlines() if "tokens/s" in ln]
    assert len(stats) == 3 and all("network calls" in ln and "\x1b" not in ln for ln in stats)
    assert text.split("model> ")[1].startswith(printable(session_first_reply(model)) + "\n")


def session_first_reply(model) -> str:
    """The first reply of a fresh session (same seed), generated directly: the loop prints exactly the reply."""
    return session_of(model).reply("12+3=").text


def test_commands_change_the_sampler_and_exit(model):
    session = session_of(model)
    out = io.StringIO()
    code = chat_loop(session, io.StringIO("/steps 3\n/temp 0\n/temp -1\n/steps x\n/nope\n/exit\n12+3=\n"), out)
    text = out.getvalue()
    assert code == 0 and session.sampler.steps == 3 and session.sampler.temperature == 0
    assert session.settings.temperature == 0  # the refused -1 kept the old value
    refused = text.split("/temp -1")[1].split("you> ")[0]
    assert refused.startswith("\nerror: invalid configuration") and "temperature" in refused
    assert "error: /steps needs an integer" in text and "unknown command /nope" in text
    assert "tokens/s" not in text and session.history == []  # /exit: the message after it was never read


def test_a_message_the_tokenizer_cannot_encode_is_an_error_line_not_a_crash():
    from dlm.data.tokenizers import CharTokenizer

    tok = CharTokenizer("0123456789+=: \nuseraitn")
    model = ChatModel(StubModule(tok, []), tok, None, Path("stub"))
    out = io.StringIO()
    assert chat_loop(ChatSession(model, Settings(None, None, None, 4)), io.StringIO("héllo\n"), out) == 0
    assert "error: CharTokenizer: character 'h'" in out.getvalue()


class StubModule:
    """A family whose generate writes fixed reply tokens after the prompt (to test EOS handling exactly)."""

    def __init__(self, tokenizer, reply: list[int]):
        self.tokenizer, self.reply, self.mask_id = tokenizer, reply, tokenizer.mask_token_id
        self.compute_device = torch.device("cpu")
        self.sampler = None
        self.backbone = torch.nn.Module()

    def generate(self, prompt, length, sampler=None, generator=None, num_samples=1):
        tail = (self.reply + [self.tokenizer.eos_token_id] * length)[:length]
        return Generation(torch.cat([prompt, torch.tensor([tail])], dim=1), 3)


def test_the_reply_stops_at_eos_and_counts_it():
    tok = ByteTokenizer()
    eos = tok.eos_token_id
    model = ChatModel(StubModule(tok, tok.encode("55") + [eos] + tok.encode("junk")), tok, None, Path("stub"))
    reply = generate_reply(model, [{"role": "user", "content": "47+8="}], None, 8)
    assert reply.text == "55" and reply.stopped and reply.tokens == 3 and reply.network_calls == 3
    long = generate_reply(ChatModel(StubModule(tok, tok.encode("x" * 8)), tok, None, Path("s")),
                          [{"role": "user", "content": "a"}], None, 4)
    assert long.text == "xxxx" and not long.stopped and long.tokens == 4


def test_a_tokenizer_with_a_chat_template_renders_the_prompt(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dlm.data.tokenizers import HFTokenizer

    words = ["[UNK]", "user", "assistant", "hello", "world", "the", "cat", "sat"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    hf.chat_template = ("{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
                        "{% if add_generation_prompt %}assistant {% endif %}")
    hf.save_pretrained(str(tmp_path / "tok"))
    tok = HFTokenizer(str(tmp_path / "tok"))
    module = StubModule(tok, tok.encode("the cat") + [tok.eos_token_id] + tok.encode("sat"))
    prompts = []
    real = module.generate
    module.generate = lambda prompt, length, **kw: (prompts.append(prompt[0].tolist()), real(prompt, length, **kw))[1]
    reply = generate_reply(ChatModel(module, tok, None, tmp_path), [{"role": "user", "content": "hello world"}],
                           None, 6)
    assert prompts == [tok.encode("user hello world assistant")]  # the tokenizer's template, generation prompt on
    assert reply.text == "the cat" and reply.stopped
    m = tok.mask_token_id
    assert render_partial(tok, [*tok.encode("the cat"), m, *tok.encode("sat")], m, tok.eos_token_id, "_") == \
        "the cat_sat"


def test_old_turns_are_dropped_when_the_context_is_full():
    tok = ByteTokenizer()
    convo = [{"role": "system", "content": "be brief"}]
    for i in range(4):
        convo += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    convo.append({"role": "user", "content": "last"})
    assert fit_history(tok, convo, None) == convo
    budget = len(chat_ids(tok, [convo[0], *convo[-3:]]))
    kept = fit_history(tok, convo, budget)
    assert kept == [convo[0], *convo[-3:]]  # system kept, the newest turns that fit
    with pytest.raises(ConversationTooLong, match="max_new_tokens"):
        fit_history(tok, convo, 5)


def test_sampler_settings_and_their_errors(model):
    assert chat_sampler(model, steps=5, temperature=0.5).steps == 5
    with pytest.raises(ConfigError, match="block_length=4: the run's sampler AncestralSampler has no block"):
        chat_sampler(model, block_length=4)
    low = ChatModel(model.module, model.tokenizer, {"_target_": "dlm.sampling.LowConfidenceSampler", "steps": 8},
                    model.source)
    assert chat_sampler(low, block_length=4).block_length == 4
    with pytest.raises(ConfigError, match="temperature"):
        chat_sampler(model, temperature=-1.0)


def test_a_module_built_elsewhere_brings_its_sampler_convention(model):
    from dlm.conversation import chat_model_of
    from dlm.models.capabilities import ModelConventions

    backbone = model.module.backbone
    try:
        backbone.conventions = ModelConventions(sampler="low_confidence", sampler_fields={"block_length": 4})
        zoo = chat_model_of(model.module, model.tokenizer, "zoo")
        sampler = chat_sampler(zoo, steps=6)
        assert type(sampler).__name__ == "LowConfidenceSampler" and sampler.block_length == 4 and sampler.steps == 6
    finally:
        del backbone.conventions
    assert chat_model_of(model.module, model.tokenizer, "x").sampler_cfg is None  # no convention: module.sampler


def test_messages_parsing_errors():
    assert parse_messages('[{"role": "user", "content": "hi"}]') == [{"role": "user", "content": "hi"}]
    for bad, match in (('[{"role": "user"', "not JSON"), ('[{"role": "bot", "content": "x"}]', "must be one of"),
                       ("[]", "empty"), ('{"role": "user"}', "expected a list")):
        with pytest.raises(ChatError, match=match):
            parse_messages(bad)


# ---- the live view -------------------------------------------------------------------------------------------
def test_render_partial_shows_masks_and_cuts_at_eos():
    tok = ByteTokenizer()
    m, e = tok.mask_token_id, tok.eos_token_id
    assert render_partial(tok, [*tok.encode("ab"), m, m, *tok.encode("c"), e, *tok.encode("zz")], m, e, "_") == "ab__c"


def test_live_view_redraws_on_a_terminal_and_prints_plain_text_elsewhere(model):
    tty = FakeTTY()
    calls = []
    session = session_of(model, steps=4)
    view = LiveView(tty, model.tokenizer, model.module.mask_id, "·")
    view.start(8)
    reply = session.reply("12+3=", on_step=lambda ids: (calls.append(ids.clone()), view.update(ids)))
    view.finish(reply.text)
    drawn = tty.getvalue()
    assert len(calls) >= 2 and all(c.shape == (8,) for c in calls)
    assert drawn.count("\x1b[J") == len(calls) + 2  # start, every step, the final text: each over the last
    assert "model> " + "·" * 8 in drawn and drawn.endswith("model> " + printable(reply.text) + "\n")
    assert (calls[0] == model.module.mask_id).any()  # an early step still has masked positions

    plain = io.StringIO()
    chat_loop(session_of(model, steps=4), io.StringIO("12+3=\n"), plain, live=True)
    assert "\x1b" not in plain.getvalue(), repr(plain.getvalue())
    assert "·" not in plain.getvalue()


# ---- the observer changes nothing --------------------------------------------------------------------------------
FAMILIES = [
    ("method=mdlm", "sampler=ancestral"),
    ("method=mdlm", "sampler=low_confidence", "sampler.block_length=4"),
    ("method=mdlm", "sampler=threshold", "sampler.temperature=1.0"),
    ("method=mdlm", "sampler=remdm"),
    ("method=sundae",),
    ("method=diffusionbert",),
    ("method=bd3lm",),
    ("method=ar",),
]


@pytest.mark.parametrize("overrides", FAMILIES, ids=lambda o: "-".join(x.split("=")[1] for x in o[:2]))
def test_observing_the_steps_changes_no_sampled_token(overrides, tmp_path):
    from dlm.build import build_datamodule, build_module

    cfg = compose([*FAST, *BYTES, f"paths.cache_dir={tmp_path}", "sampler.steps=6", *overrides])
    torch.manual_seed(0)
    module = build_module(cfg, build_datamodule(cfg)).eval()
    prompt = torch.tensor([ByteTokenizer().encode("12+3=")])

    def run(observer):
        module.sampler.on_step = observer
        try:
            return module.generate(prompt, 12, generator=torch.Generator().manual_seed(7))
        finally:
            module.sampler.on_step = None

    plain = run(None)
    seen = []
    observed = run(lambda x: seen.append(x))
    assert torch.equal(plain.tokens, observed.tokens) and plain.num_network_calls == observed.num_network_calls
    assert seen and all(x.shape == plain.tokens.shape for x in seen)  # whole rows (BD3-LM: not just its block)
    assert all(torch.equal(x[:, :5], prompt) for x in seen)
    if "method=sundae" not in overrides:  # mask families: the last observed state is the result
        assert torch.equal(seen[-1][:, 5:][seen[-1][:, 5:] != module.mask_id],
                           plain.tokens[:, 5:][seen[-1][:, 5:] != module.mask_id])


# ---- generate messages= --------------------------------------------------------------------------------------
def test_generate_replies_to_messages(tiny_run, model, run_cli):
    from dlm.generate import main

    msgs = '[{"role": "user", "content": "12+3="}]'
    code, out, err = run_cli(main, f"run={tiny_run}", f"messages={msgs}", "length=8")
    assert code == 0, err
    summary = out.splitlines()[-1]
    assert summary.startswith("network calls:") and "tokens: 8 |" in summary and "tokens/s" in summary
    # exactly the reply a chat gives to the same conversation (same seed, the run's sampler), nothing of the prompt
    gen = generate_reply(model, parse_messages(msgs), chat_sampler(model), 8, torch.Generator().manual_seed(0))
    body = out[: out.rindex("network calls:")]
    assert body.endswith(gen.text + "\n") and "user: " not in body and "assistant: " not in body

    for args, match in (((f"messages={msgs}", "prompt=1"), "give messages= (a conversation to reply to) or prompt="),
                        (("messages=[{\"role\": \"user\"",), "messages: not JSON"),
                        (('messages=[{"role": "robot", "content": "x"}]',), "messages[0].role='robot'")):
        code, out, err = run_cli(main, f"run={tiny_run}", *args)
        assert code == 2 and match in err and "Traceback" not in err, err
        assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1


def test_chat_cli_in_process_exits_0_at_eof(tiny_run, run_cli, monkeypatch):
    from dlm.chat import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("12+3=\n"))
    code, out, err = run_cli(main, f"run={tiny_run}", "max_new_tokens=6", "steps=2", "temperature=0")
    assert code == 0, err
    assert "you> 12+3=" in out and "model> " in out and re.search(r"\d+ network calls", out)
    code, out, err = run_cli(main, f"run={tiny_run}", "steps=0", "live=maybe")
    assert code == 2 and "steps=0 must be a positive integer" in err and "live=" in err
    for args, match in (((), "run= is required"), ((f"run={tiny_run}/nosuch",), "no such file or folder"),
                        ((f"run={tiny_run}", "block_length=4"), "has no block length")):
        code, out, err = run_cli(main, *args)
        assert code == 2 and match in err and "Traceback" not in err, err


# ---- the chat CLI in a terminal (tmux) ------------------------------------------------------------------------
@pytest.mark.slow  # ~20-40 s on 2 shared CPU cores: a subprocess chat in a tmux pane
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_chat_cli_in_tmux(tiny_run, tmp_path):
    socket, name = f"dlm-chat-{os.getpid()}", "chat"
    status = tmp_path / "status"
    env = " ".join(f"{k}={v}" for k, v in (("HF_HUB_OFFLINE", "1"), ("WANDB_MODE", "offline"),
                                           ("PYTHONPATH", os.environ.get("PYTHONPATH", ""))))
    cmd = (f"cd {Path.cwd()} && env {env} {sys.executable} -m dlm.chat run={tiny_run} max_new_tokens=12 steps=4; "
           f"echo $? > {status}; sleep 60")

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, check=True).stdout

    def wait_for(predicate, what: str, timeout: float = 120) -> str:
        end = time.time() + timeout
        while time.time() < end:
            pane = tmux("capture-pane", "-p", "-t", name)
            if predicate(pane):
                return pane
            time.sleep(0.5)
        raise AssertionError(f"no {what} in the pane after {timeout} s:\n{pane}")

    tmux("new-session", "-d", "-s", name, "-x", "120", "-y", "40", cmd)
    try:
        wait_for(lambda p: "you>" in p, "prompt")
        tmux("send-keys", "-t", name, "12+3=", "Enter")
        pane = wait_for(lambda p: p.count("tokens/s") == 1 and p.rstrip().endswith("you>"), "reply")
        assert "you> 12+3=" in pane and "model> " in pane and "network calls" in pane
        assert "·" not in pane.split("model> ")[1].split("\n")[0]  # redrawn in place: the final text, no masks left
        tmux("send-keys", "-t", name, "/reset", "Enter")
        wait_for(lambda p: "(conversation cleared)" in p, "reset")
        tmux("send-keys", "-t", name, "4+5=", "Enter")
        wait_for(lambda p: p.count("tokens/s") == 2 and p.rstrip().endswith("you>"), "second reply")
        tmux("send-keys", "-t", name, "C-d")
        end = time.time() + 60
        while not status.is_file() and time.time() < end:
            time.sleep(0.5)
        assert status.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
