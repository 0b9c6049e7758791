"""End-of-turn stops (dlm/stop_tokens.py, ``model.conventions.stop_tokens``): the token strings resolve to ids with
the run's tokenizer (a missing one refused by name), every family keeps EOS + them as ``stop_ids``, AR and BD3-LM
fill a row with EOS after its first stop token, and a chat reply (dlm.conversation, ``dlm.generate messages=``) stops
at one and never shows or stores it. The tokenizer is a tiny character one with an end-of-turn token."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from tiny_checkpoint import MASK, MASK_ID, write_tiny_checkpoint

from dlm.models.capabilities import ModelConventions
from dlm.sampling.base import Generation, cut_at_eos
from dlm.stop_tokens import StopTokenError, stop_ids

EOT = "<|eot|>"
EOT_ID = MASK_ID  # added after the vocabulary, before the mask token that dlm's HFTokenizer adds
# each turn ends with the end-of-turn token (as LLaDA-Instruct's <|eot_id|>, Dream's <|im_end|>)
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}<|eot|>{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """tiny_checkpoint's Qwen3 whose tokenizer also has <|eot|> (the first id after the vocabulary) and a chat template that ends turns with it."""
    from transformers import AutoTokenizer

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("eot") / "ckpt", chat=True)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.add_special_tokens({"additional_special_tokens": [EOT]})
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(path))
    return path


def _args(folder: Path, stops=(EOT,)) -> list[str]:
    listed = ", ".join(f"'{s}'" for s in stops)
    return [f"model.pretrained={folder}", "model.config=null",
            f"+model.conventions={{tokenizer: '{folder}', mask_token: '{MASK}', mask_token_id: {MASK_ID + 1}, "
            f"stop_tokens: [{listed}]}}"]


def _load(folder: Path, method: str, *extra: str):
    from dlm.run import load_model

    return load_model("qwen3_tiny", [*_args(folder), *extra], method=method)


def _always(module, token: int) -> None:
    """The backbone predicts ``token`` at every position (a forward hook over its logits)."""

    def hook(_, __, out):
        logits = out[0] if isinstance(out, tuple) else out
        logits.fill_(0.0)
        logits[..., token] = 30.0
        return out

    module.backbone.register_forward_hook(hook)


def test_stop_tokens_resolve_with_the_tokenizer_and_a_missing_one_is_refused(folder):
    from dlm.data.tokenizers import HFTokenizer

    tok = HFTokenizer(str(folder), mask_token=MASK)
    eos, eot = tok.eos_token_id, tok.hf_tokenizer.convert_tokens_to_ids(EOT)
    assert eot == EOT_ID and stop_ids(tok, [EOT]) == (eos, eot) and stop_ids(tok, None) == (eos,)
    assert stop_ids(tok, ["<eos>", EOT, EOT]) == (eos, eot)  # EOS first, no duplicates
    with pytest.raises(StopTokenError, match=r"model.conventions.stop_tokens: '<\|im_end\|>' is not a token"):
        stop_ids(tok, ["<|im_end|>"])
    assert ModelConventions.from_config({"stop_tokens": [EOT]}).stop_tokens == (EOT,)
    assert ModelConventions.from_config({"stop_tokens": EOT}).stop_tokens == (EOT,)
    assert cut_at_eos([5, 6, 48, 7, 1], (1, 48)) == [5, 6] and cut_at_eos([5, 6], (1,)) == [5, 6]


def test_the_instruct_model_configs_name_their_end_of_turn_tokens():
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parent.parent / "conf" / "model"
    for name, token in (("llada_8b_instruct", "<|eot_id|>"), ("llada_1p5_8b", "<|eot_id|>"),
                        ("dream_7b_instruct", "<|im_end|>"), ("llada_moe_instruct", "<|role_end|>")):
        conventions = OmegaConf.load(conf / f"{name}.yaml").conventions
        assert ModelConventions.from_config(OmegaConf.to_container(conventions)).stop_tokens == (token,), name


def test_ar_finishes_a_row_at_the_end_of_turn_token(folder):
    from dlm.sampling import ARSampler

    module = _load(folder, "ar").module
    eos, eot = module.eos_id, EOT_ID
    assert module.stop_ids == (eos, eot)
    _always(module, eot)
    gen = module.generate(torch.tensor([[5, 6, 7]]), 6, sampler=ARSampler(temperature=0.0))
    assert gen.tokens[0, 3:].tolist() == [eot] + [eos] * 5  # the turn ends: EOS after it, no more decoding
    assert gen.num_network_calls == 1


def test_bd3lm_fills_eos_after_the_end_of_turn_token(folder):
    module = _load(folder, "bd3lm", "method.block_size=4", "sampler.steps=4").module
    eos, eot = module.eos_id, EOT_ID
    _always(module, eot)
    gen = module.generate(torch.tensor([[5, 6, 7, 8]]), 8)
    assert gen.tokens[0, 4:].tolist() == [eot] + [eos] * 7


class Scripted:
    """A family stand-in that writes ``reply`` after the prompt (EOS after it), with a real module's stop ids."""

    def __init__(self, real, reply: list[int]):
        self.tokenizer, self.reply, self.stop_ids = real.tokenizer, reply, real.stop_ids
        self.mask_id, self.sampler, self.backbone = real.mask_id, None, real.backbone
        self.compute_device = torch.device("cpu")

    def generate(self, prompt, length, sampler=None, generator=None, num_samples=1):
        tail = (self.reply + [self.tokenizer.eos_token_id] * length)[:length]
        return Generation(torch.cat([prompt, torch.tensor([tail] * prompt.shape[0])], dim=1), 2)


def test_a_chat_reply_stops_at_the_end_of_turn_token_and_never_holds_it(folder):
    from dlm.chat import ChatSession, Settings, chat_loop
    from dlm.conversation import ChatModel, generate_reply, render_partial

    loaded = _load(folder, "mdlm")
    tok = loaded.datamodule.tokenizer
    eot = EOT_ID
    module = Scripted(loaded.module, tok.encode("hi") + [eot] + tok.encode("junk"))
    model = ChatModel(module, tok, None, folder)
    reply = generate_reply(model, [{"role": "user", "content": "hello"}], None, 8)
    assert reply.text == "hi" and reply.ids == tok.encode("hi") and reply.stopped and reply.tokens == 3
    assert render_partial(tok, [*tok.encode("hi"), eot, *tok.encode("zz")], MASK_ID + 1, module.stop_ids) == "hi"
    session = ChatSession(model, Settings(steps=None, temperature=None, block_length=None, max_new_tokens=8))
    out = io.StringIO()
    chat_loop(session, io.StringIO("hello\n"), out)
    assert session.history[-1] == {"role": "assistant", "content": "hi"}  # the stored turn: no end-of-turn token
    assert "model> hi\n" in out.getvalue() and "(no EOS" not in out.getvalue()


def test_generate_messages_prints_the_reply_up_to_the_end_of_turn_token(folder, run_cli, monkeypatch):
    from dlm.generate import main
    from dlm.methods.mdlm import MDLM

    def scripted(self, prompt, length, sampler=None, generator=None, num_samples=1):
        tail = (self.tokenizer.encode("hi") + [EOT_ID] + self.tokenizer.encode("junk") + [self.eos_id] * length)[:length]
        return Generation(torch.cat([prompt, torch.tensor([tail] * prompt.shape[0])], dim=1), 1)

    monkeypatch.setattr(MDLM, "generate", scripted)
    code, out, err = run_cli(main, "model=qwen3_tiny", *_args(folder), 'messages=[{"role": "user", "content": "a"}]',
                             "length=8")
    assert code == 0, err
    body = out[: out.rindex("network calls:")]
    assert body.endswith("\nhi\n") or body == "hi\n", out
    assert "junk" not in out and EOT not in out
