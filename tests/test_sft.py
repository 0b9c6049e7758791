"""Supervised fine-tuning on chat data: the response mask from the chat template (exact on multi-turn, equal to
apply_chat_template), the EOS-fill policy (data.eos_loss, exact counts), chat rows and sources (local JSONL and
Parquet), every family keeping the prompt clean, and the embedded instruction task (data=instructions)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dlm.data.chat import ChatError, TemplateError, chat_ids, sft_ids
from dlm.data.chat_sources import ChatDatasetSource, InstructionsSource
from dlm.data.instructions import InstructionsTask, reply
from dlm.data.packing import pack_chat, pad_each_chat
from dlm.data.sft import ChatDataModule
from dlm.data.tokenizers import CharTokenizer, HFTokenizer

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
WORDS = ["[UNK]", "hello", "world", "the", "cat", "sat", "on", "mat", "be", "brief", "yes", "no"]
SPECIAL = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "the cat"},
    {"role": "user", "content": "the mat"},
    {"role": "assistant", "content": "yes no yes"},
]


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory) -> HFTokenizer:
    """A tiny word-level HF tokenizer with a jinja chat template, saved in tmp_path (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("chat_tok")
    vocab = {w: i for i, w in enumerate(WORDS + SPECIAL)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", additional_special_tokens=SPECIAL)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(folder))
    return HFTokenizer(str(folder))


def words(tok, ids) -> list[str]:
    return [tok.hf_tokenizer.convert_ids_to_tokens(i) for i in ids]


# ---- the encoding -------------------------------------------------------------------------------------------
def test_sft_ids_equal_apply_chat_template_and_round_trip(hf_tok):
    ids, response = sft_ids(hf_tok, CONVERSATION)
    hf = hf_tok.hf_tokenizer
    expected = hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=False, return_dict=False)
    assert ids == list(expected) == chat_ids(hf_tok, CONVERSATION, add_generation_prompt=False)
    text = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=False)
    assert hf.decode(ids, skip_special_tokens=False).split() == text.split()  # round trip (word level: spaces)
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    assert len(response) == len(ids)


def test_response_mask_is_exact_on_multi_turn(hf_tok):
    ids, response = sft_ids(hf_tok, CONVERSATION)
    toks = words(hf_tok, ids)
    assert toks == ["<|system|>", "be", "brief", "<|end|>", "<|user|>", "hello", "world", "<|end|>",
                    "<|assistant|>", "the", "cat", "<|end|>", "<|user|>", "the", "mat", "<|end|>",
                    "<|assistant|>", "yes", "no", "yes", "<|end|>"]
    # every assistant reply and its end-of-turn token, nothing else (the role header is the generation prompt)
    expected = [False] * 9 + [True] * 3 + [False] * 5 + [True] * 4
    assert response == expected
    assert [t for t, r in zip(toks, response) if r] == ["the", "cat", "<|end|>", "yes", "no", "yes", "<|end|>"]


def test_plain_template_response_mask_for_a_tokenizer_without_one():
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz: \n")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok"}, {"role": "assistant", "content": "k"}]
    ids, response = sft_ids(tok, msgs)
    eos = tok.eos_token_id
    u1, a1 = tok.encode("user: hi\n"), tok.encode("assistant: ")
    u2 = tok.encode("user: ok\n")
    nl = tok.encode("\n")
    assert ids == u1 + a1 + tok.encode("yo") + [eos] + nl + u2 + a1 + tok.encode("k") + [eos] + nl
    expected = ([False] * (len(u1) + len(a1)) + [True] * 4 + [False] * (len(u2) + len(a1)) + [True] * 3)
    assert response == expected
    # the first reply's span is what the generation prompt of the first turn is continued by
    assert ids[: len(u1) + len(a1)] == chat_ids(tok, msgs[:1], add_generation_prompt=True)


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path, hf_tok):
    hf = hf_tok.hf_tokenizer
    # the last reply rendered in full, earlier ones cut short (like templates that drop earlier reasoning)
    hf.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {% if m['role'] != 'assistant' or loop.last %}"
                        "{{ m['content'] }}{% endif %} <|end|> {% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    try:
        with pytest.raises(TemplateError, match="renders turn 2 differently"):
            sft_ids(hf_tok, CONVERSATION)
    finally:
        hf.chat_template = TEMPLATE
    with pytest.raises(ChatError, match="at least one assistant turn"):
        sft_ids(hf_tok, CONVERSATION[:2])


# ---- rows and the EOS policy --------------------------------------------------------------------------------
EXAMPLES = [([1, 2, 3, 4, 5], [False, False, True, True, False]), ([6, 7, 8], [False, True, True])]


@pytest.mark.parametrize("eos_loss", [True, False])
def test_eos_fill_is_counted_exactly_as_the_option_says(eos_loss):
    rows = pad_each_chat(EXAMPLES, seq_len=8, eos_id=9, eos_loss=eos_loss)
    assert rows["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 9, 9], [6, 7, 8, 9, 9, 9, 9, 9]]
    fill = [[False] * 5 + [True] * 3, [False] * 3 + [True] * 5]
    response = [[False, False, True, True, False] + [False] * 3, [False, True, True] + [False] * 5]
    expected = np.array(response) | (np.array(fill) & eos_loss)
    assert rows["loss_mask"].tolist() == expected.tolist()
    assert int(rows["loss_mask"].sum()) == 2 + 2 + (3 + 5 if eos_loss else 0)
    # the prompt is never counted, either way
    assert not rows["loss_mask"][0, :2].any() and not rows["loss_mask"][1, 0]


def test_truncated_conversations_are_counted_and_keep_a_final_eos():
    rows = pad_each_chat(EXAMPLES, seq_len=4, eos_id=9, eos_loss=True)
    assert rows["input_ids"].tolist() == [[1, 2, 3, 9], [6, 7, 8, 9]]
    assert rows["loss_mask"].tolist() == [[False, False, True, True], [False, True, True, True]]
    assert int(rows["num_truncated"]) == 1


def test_packed_chat_rows_count_only_responses():
    rows = pack_chat(EXAMPLES, seq_len=3, eos_id=9, pad_id=0)
    assert rows["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 0]]
    assert rows["loss_mask"].tolist() == [[False, False, True], [True, False, False], [True, True, False]]
    assert rows["doc_ids"].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 1]]


# ---- sources and the data module ----------------------------------------------------------------------------
def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("eos_loss", [True, False])
def test_chat_data_module_on_local_files(tmp_path, hf_tok, fmt, eos_loss):
    rows = [{"messages": CONVERSATION}] * 6 + [{"messages": CONVERSATION[1:3]}] * 6
    if fmt == "jsonl":
        files = write_jsonl(tmp_path / "chat.jsonl", rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = str(tmp_path / "chat.parquet")
        pq.write_table(pa.Table.from_pylist(rows), files)
    src = ChatDatasetSource(data_files=files, max_val_conversations=2)
    assert src.path == ("json" if fmt == "jsonl" else "parquet") and src.hub_problem() is None
    dm = ChatDataModule(src, hf_tok, eos_loss=eos_loss, seq_len=24, batch_size=4, cache_dir=str(tmp_path / "c"))
    dm.setup()
    assert dm.num_val_rows == 2 and dm.num_train_rows == 10
    ids, counted = dm.train_data["input_ids"], dm.train_data["loss_mask"]
    n_full, n_short = len(sft_ids(hf_tok, CONVERSATION)[0]), len(sft_ids(hf_tok, CONVERSATION[1:3])[0])
    # rows 0..3 of train are the long conversation (the first 2 rows were held out), the rest the short one
    per_row = [7 + (24 - n_full) * eos_loss] * 4 + [3 + (24 - n_short) * eos_loss] * 6
    assert counted.sum(1).tolist() == per_row
    assert (ids[:, n_full:][:4] == hf_tok.eos_token_id).all()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "loss_mask"} and batch["loss_mask"].dtype == torch.bool


def test_field_mapping_and_role_map(tmp_path, hf_tok):
    files = write_jsonl(tmp_path / "qa.jsonl", [{"question": "hello world", "answer": "yes"}] * 3)
    src = ChatDatasetSource(data_files=files, prompt="{question}", response="the {answer}", system="be brief",
                            max_val_conversations=1)
    assert list(src.conversations("val")) == [[{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "hello world"},
                                               {"role": "assistant", "content": "the yes"}]]
    assert len(list(src.conversations("train"))) == 2
    share = write_jsonl(tmp_path / "share.jsonl",
                        [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}] * 2)
    src = ChatDatasetSource(data_files=share, messages_field="conversations", role_key="from", content_key="value",
                            role_map={"human": "user", "gpt": "assistant"}, max_val_conversations=1)
    assert next(iter(src.conversations("train"))) == [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "yo"}]
    bad = ChatDatasetSource(data_files=files, prompt="{question}", response="{missing}")
    with pytest.raises(ChatError, match="'missing'"):
        list(bad.conversations("val"))
    with pytest.raises(ChatError, match=r"\.jsonl, \.json or \.parquet"):
        ChatDatasetSource(data_files=str(tmp_path / "chat.csv"))


# ---- every family keeps the prompt clean --------------------------------------------------------------------
TOK = SimpleNamespace(vocab_size=9, pad_token_id=6, eos_token_id=7, mask_token_id=8)
PROMPT = 5  # the first 5 positions are the prompt


def family(name: str):
    from dlm.methods.ar import AR
    from dlm.methods.bd3lm import BD3LM
    from dlm.methods.diffusionbert import DiffusionBERT
    from dlm.methods.mdlm import MDLM
    from dlm.methods.sundae import SUNDAE
    from dlm.models import Transformer
    from dlm.schedules import LinearSchedule
    from dlm.spindle import SpindleSchedule

    torch.manual_seed(0)
    backbone = Transformer(vocab_size=9, n_layers=1, d_model=32, n_heads=4, max_seq_len=32)
    if name == "mdlm":
        return MDLM(backbone, TOK, LinearSchedule())
    if name == "bd3lm":
        return BD3LM(backbone, TOK, LinearSchedule(), block_size=4)
    if name == "diffusionbert":
        m = DiffusionBERT(backbone, TOK, SpindleSchedule(0.3), num_steps=8)
        m.set_token_counts(torch.tensor([9, 8, 7, 6, 5, 4, 0, 3, 0]))
        return m
    if name == "sundae":
        return SUNDAE(backbone, TOK, unroll_steps=2)
    return AR(backbone, TOK)


def sft_batch(B: int = 64, T: int = 12) -> dict:
    ids = torch.randint(0, 6, (B, T), generator=torch.Generator().manual_seed(0))
    counted = torch.ones(B, T, dtype=torch.bool)
    counted[:, :PROMPT] = False
    return {"input_ids": ids, "loss_mask": counted}


@pytest.mark.parametrize("name", ["mdlm", "bd3lm", "diffusionbert", "sundae"])
def test_each_family_corrupts_only_response_tokens(name):
    model = family(name)
    batch = sft_batch()
    x0 = batch["input_ids"]
    seen = []
    hook = model.backbone.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        for seed in range(4):
            model.loss(batch, generator=torch.Generator().manual_seed(seed))
    finally:
        hook.remove()
    corrupted = torch.zeros_like(x0, dtype=torch.bool)
    for inp in seen:
        xt = inp[:, : x0.shape[1]]  # BD3-LM runs [x_t, x_0] side by side: the noisy half comes first
        corrupted |= xt != x0
        assert torch.equal(xt[:, :PROMPT], x0[:, :PROMPT]), f"{name} corrupted a prompt token"
    assert corrupted[:, PROMPT:].any(0).all(), f"{name}: some response position is never corrupted"


@pytest.mark.parametrize("name", ["mdlm", "bd3lm", "diffusionbert", "ar"])
def test_the_bound_and_loss_count_response_tokens_only(name):
    model = family(name)
    batch = sft_batch()
    nll = model.nll_bound(batch, generator=torch.Generator().manual_seed(0))
    assert (nll[:, :PROMPT] == 0).all() and (nll[:, PROMPT:] > 0).any()
    if name == "ar":  # response-only cross-entropy, averaged per response token
        loss = model.loss(batch)["loss"]
        assert torch.allclose(loss, nll.sum() / batch["loss_mask"].sum())


# ---- the embedded instruction task --------------------------------------------------------------------------
def test_instruction_replies_and_splits():
    assert reply("close", "(([") == "]))" and reply("close", "([{") == "}])"
    assert reply("reverse", "abc") == "cba" and reply("add", "47+8") == "55"
    task = InstructionsTask(num_train=3000, num_val=30)
    train = {tuple(x) for x in task.items("train")}
    val = task.items("val")
    assert len(val) == 30 and {k for k, _ in val} == {"close", "reverse", "add"} and not train & set(val)
    assert {k for k, _ in train} == {"close", "reverse", "add"}
    prompt = task.prompts(1)[0]
    kind, arg = prompt.split("\n")[0].removeprefix("user: ").split(": ")
    assert task.is_valid(prompt + reply(kind, arg)) and not task.is_valid(prompt + reply(kind, arg) + "x")
    text, positions = task.infill_items(1)[0]
    assert task.is_valid(text) and text[positions[0]:] == reply(*task._val_choice(1, 0)[0])
    assert InstructionsTask(seed=1).items("val") != task.items("val")


def test_instruction_conversations_encode_with_the_configured_tokenizer(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load("conf/data/instructions.yaml")
    tok = CharTokenizer(cfg.tokenizer.alphabet)
    src = InstructionsSource(**{k: v for k, v in cfg.source.items() if k != "_target_"})
    assert set(src.task.alphabet) <= set(tok.alphabet)
    longest = max(len(sft_ids(tok, c)[0]) for c in src.conversations("val") + src.conversations("train")[:2000])
    assert longest < cfg.seq_len  # at least one EOS fill position per row
    dm = ChatDataModule(src, tok, seq_len=cfg.seq_len, batch_size=8, cache_dir=None)
    dm.setup()
    row, counted = dm.val_data["input_ids"][0], dm.val_data["loss_mask"][0]
    text = tok.decode(row[: int(np.argmax(counted))])
    assert text.startswith("user: ") and text.endswith("assistant: ")  # everything before the reply is context


@pytest.mark.parametrize("eos_loss", [True, False])
def test_completion_only_loss_false_counts_the_whole_conversation(eos_loss):
    """data.completion_only_loss=false (TRL's option): every conversation token counts, the prompt too; the EOS fill
    still follows eos_loss; true (the default) is the reply only."""
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz0123456789+:()[]{} \n")
    src = InstructionsSource(kinds=["reverse"], num_train=8, num_val=4)
    rows = {}
    for only in (True, False):
        dm = ChatDataModule(src, tok, eos_loss=eos_loss, completion_only_loss=only, seq_len=40, batch_size=4,
                            cache_dir=None)
        dm.setup()
        rows[only] = dm.val_data
    assert np.array_equal(rows[True]["input_ids"], rows[False]["input_ids"])
    for i, conversation in enumerate(src.conversations("val")):
        ids, response = sft_ids(tok, conversation)
        n = len(ids)
        assert rows[False]["loss_mask"][i, :n].all() and rows[True]["loss_mask"][i, :n].tolist() == response
        assert (rows[False]["loss_mask"][i, n:] == eos_loss).all()
    with pytest.raises(ValueError, match="completion_only_loss must be true or false"):
        ChatDataModule(src, tok, completion_only_loss="no", seq_len=24, batch_size=4, cache_dir=None)


# ---- SFT on the embedded task beats the base ----------------------------------------------------------------
SFT_TASK = ["data=instructions", "data.source.kinds=[close]", "data.source.max_open=4", "data.source.num_val=24",
            "data.source.num_train=4000", "data.batch_size=32", "optimizer.lr=3e-3", "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "logger=none",
            "samples.num_unconditional=0", "samples.num_prompted=24", "samples.num_infill=0"]


@pytest.mark.slow  # two in-process runs, ~30 s of CPU (over a minute on a loaded machine)
def test_sft_on_the_instruction_task_beats_the_base(train_cli, run_cli, workdir):
    """Fixed seed: the base (the fresh init: one step at lr 0) answers no held-out instruction; 250 SFT steps
    answer most (0.83 measured; the bar is 0.5). dlm.evaluate scores the run through the same task hook."""
    from dlm.evaluate import main as evaluate
    from tests.conftest import run_dir_of

    def accuracy(*args: str):
        code, out, err = train_cli(*SFT_TASK, *args)
        assert code == 0, err[-2000:]
        run = run_dir_of(out)
        return json.loads((run / "results.json").read_text())["sample/prompted_acc"], run

    base, _ = accuracy("name=base", "trainer.max_steps=1", "trainer.val_check_interval=1", "optimizer.lr=0")
    sft, run = accuracy("name=sft", "trainer.max_steps=250", "trainer.val_check_interval=250")
    assert base <= 0.1 and sft >= base + 0.5, (base, sft)
    code, out, err = run_cli(evaluate, f"run={run}", "likelihood=false", "samples.num_unconditional=0",
                             "samples.num_prompted=24", "samples.num_infill=0", "wandb=off", "progress_bar=false")
    assert code == 0, err[-2000:]
    assert json.loads((run / "results.json").read_text())["eval/sample/prompted_acc"] >= base + 0.5
