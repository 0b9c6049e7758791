"""Tests for dlm.data: tokenizers, arithmetic task, sources, packing, cache, datamodule, configs."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from dlm.data import (  # noqa: E402
    ArithmeticSource,
    ArithmeticTask,
    ByteTokenizer,
    CharTokenizer,
    DLMDataModule,
    HFDatasetSource,
    HFTokenizer,
    ResumableRandomSampler,
    TextFilesSource,
    cache_key,
    check_special_ids,
    load_or_build,
    pack,
    pad_each,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "data"
ALPHA = "0123456789+="


# ---------------------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------------------
def test_char_tokenizer_roundtrip_and_specials():
    tok = CharTokenizer("abca")  # duplicate dropped
    assert tok.alphabet == "abc"
    assert (tok.pad_token_id, tok.eos_token_id, tok.mask_token_id, tok.vocab_size) == (3, 4, 5, 6)
    assert tok.bos_token_id is None
    ids = tok.encode("cab")
    assert ids == [2, 0, 1]
    assert tok.decode(ids) == "cab"
    with_specials = ids + [tok.mask_token_id, tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(with_specials) == "cab"
    assert tok.decode(torch.tensor(with_specials), skip_special_tokens=False) == "cab_<eos><pad>"
    assert tok.decode_until_eos([0, tok.eos_token_id, 1]) == "a"
    check_special_ids(tok)


def test_char_tokenizer_unknown_char():
    tok = CharTokenizer(ALPHA)
    with pytest.raises(ValueError, match=r"'x'.*not in the alphabet '0123456789\+='"):
        tok.encode("1+x=2")


def test_char_tokenizer_fingerprint_stable():
    assert CharTokenizer("abc").fingerprint() == CharTokenizer("abc").fingerprint()
    assert CharTokenizer("abc").fingerprint() != CharTokenizer("abd").fingerprint()


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.mask_token_id, tok.bos_token_id, tok.vocab_size) == (
        256,
        257,
        258,
        259,
        260,
    )
    text = "héllo ☃"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([104, 258, 105, 257], skip_special_tokens=False) == "h<mask>i<eos>"
    assert tok.decode([104, 258, 105, 257]) == "hi"
    assert tok.decode([0xFF]) == "\ufffd"  # errors="replace"
    check_special_ids(tok)


def test_check_special_ids_errors():
    tok = CharTokenizer("ab")
    bad = SimpleNamespace(
        vocab_size=tok.vocab_size,
        mask_token_id=99,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with pytest.raises(ValueError, match=r"mask_token_id=99 is outside \[0, vocab_size=5\)"):
        check_special_ids(bad)
    bad.mask_token_id = tok.pad_token_id
    with pytest.raises(ValueError, match="equals pad_token_id.*distinct"):
        check_special_ids(bad)
    bad.mask_token_id = tok.eos_token_id
    bad.pad_token_id = 0
    with pytest.raises(ValueError, match="equals eos_token_id.*distinct"):
        check_special_ids(bad)


def _save_tiny_hf_tokenizer(folder: Path, with_mask: bool = False, mask_in_vocab: str | None = None) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "hello", "world", "the", "cat", "sat"]
    if mask_in_vocab:
        words.append(mask_in_vocab)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"unk_token": "[UNK]"}
    if with_mask:
        kwargs["mask_token"] = "[MASK]"
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    tok.save_pretrained(str(folder))
    return str(folder)


def test_hf_tokenizer_local_folder_adds_mask_and_eos(tmp_path):
    path = _save_tiny_hf_tokenizer(tmp_path / "tok")
    tok = HFTokenizer(path)
    assert "not loaded" in repr(tok)
    ids = tok.encode("hello the cat")
    assert ids == [1, 3, 4]
    # added <|endoftext|> and <|mask|>; pad falls back to eos
    assert tok.vocab_size == 8
    assert tok.hf_tokenizer.convert_ids_to_tokens(tok.mask_token_id) == "<|mask|>"
    assert tok.hf_tokenizer.convert_ids_to_tokens(tok.eos_token_id) == "<|endoftext|>"
    assert tok.pad_token_id == tok.eos_token_id
    check_special_ids(tok)
    assert tok.decode(ids + [tok.mask_token_id]) == "hello the cat"
    assert "<|mask|>" in tok.decode(ids + [tok.mask_token_id], skip_special_tokens=False)
    assert tok.encode_batch(["hello world", "cat"]) == [[1, 2], [4]]
    assert tok.fingerprint() == HFTokenizer(path).fingerprint()


def test_hf_tokenizer_mask_choices(tmp_path):
    own = HFTokenizer(_save_tiny_hf_tokenizer(tmp_path / "own", with_mask=True), mask_token="<ignored>")
    assert own.hf_tokenizer.convert_ids_to_tokens(own.mask_token_id) == "[MASK]"
    given = HFTokenizer(_save_tiny_hf_tokenizer(tmp_path / "given", mask_in_vocab="[M]"), mask_token="[M]")
    assert given.mask_token_id == 6  # the existing vocabulary entry is reused
    assert given.vocab_size == 8  # + <|endoftext|>
    check_special_ids(given)


def test_hf_tokenizer_missing_folder_message(tmp_path):
    tok = HFTokenizer(str(tmp_path / "nope"))
    with pytest.raises(OSError, match="could not load tokenizer.*local folder"):
        _ = tok.vocab_size


# ---------------------------------------------------------------------------------------------------------
# arithmetic task
# ---------------------------------------------------------------------------------------------------------
def test_arithmetic_is_valid():
    t = ArithmeticTask()
    for good in ["47+8=55", "0+0=0", "99+99=198", " 12+30=42 ", "123+4=127"]:
        assert t.is_valid(good), good
    for bad in [
        "47+8=56",
        "47+8=",
        "47+8",
        "047+8=55",
        "47+8=055",
        "47-8=39",
        "4 7+8=55",
        "47+8=55x",
        "",
        "+=",
        "47++8=55",
        "47+8=55=55",
    ]:
        assert not t.is_valid(bad), bad


def test_arithmetic_docs_deterministic_and_disjoint():
    a, b = ArithmeticTask(seed=3), ArithmeticTask(seed=3)
    assert a.documents("train") == b.documents("train")
    assert a.documents("val") == b.documents("val")
    assert ArithmeticTask(seed=4).documents("train") != a.documents("train")
    train, val = a.documents("train"), a.documents("val")
    assert len(train) == 20000 and len(val) == 512 and len(set(val)) == 512
    assert not set(train) & set(val)
    assert all(a.is_valid(d) and set(d) <= set(a.alphabet) for d in train[:2000] + val)
    assert max(len(d) for d in train) <= a.max_doc_len == 9
    assert a.documents("validation") == val
    with pytest.raises(ValueError, match="unknown split 'bogus'.*'train' or 'val'"):
        a.documents("bogus")


def test_arithmetic_large_digits_sampling_disjoint():
    t = ArithmeticTask(n_digits=5, num_train=3000, num_val=200, seed=1)
    tr, va = t.documents("train"), t.documents("val")
    assert len(tr) == 3000 and len(va) == 200 and not set(tr) & set(va)
    assert all(t.is_valid(d) for d in tr)


def test_arithmetic_score_prompts_infill():
    t = ArithmeticTask()
    s = t.score_samples(["1+1=2", "1+1=3", "1+1=2", "garbage"])
    assert s == {"valid_frac": 0.5, "wellformed_frac": 0.75, "unique_frac": 0.75}
    prompts = t.prompts(20, seed=0)
    assert prompts == t.prompts(20, seed=0)
    val = set(t.documents("val"))
    for p in prompts:
        assert p.endswith("=")
        a, b = p[:-1].split("+")
        assert t.is_valid(p + str(int(a) + int(b)))
        assert p + str(int(a) + int(b)) in val
    items = t.infill_items(50, seed=1)
    assert items == t.infill_items(50, seed=1)
    for text, pos in items:
        assert t.is_valid(text) and text in val
        assert len(pos) == 1 and text[pos[0]].isdigit() and pos[0] < text.index("=")
        # exactly one digit completes the hole: the one in the text
        fills = [d for d in "0123456789" if t.is_valid(text[: pos[0]] + d + text[pos[0] + 1 :])]
        assert fills == [text[pos[0]]]
    assert t.fingerprint() != ArithmeticTask(num_train=100).fingerprint()


def test_arithmetic_bad_args():
    with pytest.raises(ValueError, match="num_val=100 leaves no training problems.*lower num_val"):
        ArithmeticTask(n_digits=1, num_val=100)


# ---------------------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------------------
EOS, PAD = 100, 101


def test_pack_roundtrip_and_doc_ids():
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [12, 13]]
    out = pack(docs, seq_len=4, eos_id=EOS, pad_id=PAD)
    ids, dids, lm = out["input_ids"], out["doc_ids"], out["loss_mask"]
    assert ids.dtype == np.int64 and dids.dtype == np.int32 and lm.dtype == np.bool_
    total = sum(len(d) + 1 for d in docs)  # 17 -> 5 rows, 3 pads
    assert ids.shape == (5, 4)
    flat = ids.reshape(-1)
    assert lm.reshape(-1).sum() == total and not lm.reshape(-1)[total:].any()
    assert (flat[total:] == PAD).all()
    # round trip
    got, cur = [], []
    for t in flat[:total].tolist():
        if t == EOS:
            got.append(cur)
            cur = []
        else:
            cur.append(t)
    assert got == docs
    # doc ids: per row, restarting at 0, cut docs continue as doc 0
    expected = np.array(
        [
            [0, 0, 0, 0],  # 1 2 3 E
            [0, 0, 1, 1],  # 4 E 5 6
            [0, 0, 0, 0],  # 7 8 9 10
            [0, 0, 1, 1],  # 11 E 12 13
            [0, 1, 1, 1],  # E P P P  (pads get their own id)
        ]
    )
    np.testing.assert_array_equal(dids, expected)
    assert int(out["num_truncated"]) == 0


def test_pack_exact_fit_has_no_padding():
    out = pack([[1, 2, 3], [4, 5, 6]], seq_len=4, eos_id=EOS, pad_id=PAD)
    assert out["input_ids"].shape == (2, 4) and out["loss_mask"].all()


def test_pad_each_eos_fill_and_truncation():
    docs = [[1, 2], [3, 4, 5, 6, 7, 8], [9]]
    out = pad_each(docs, seq_len=5, eos_id=EOS)
    assert "doc_ids" not in out
    np.testing.assert_array_equal(
        out["input_ids"],
        [[1, 2, EOS, EOS, EOS], [3, 4, 5, 6, EOS], [9, EOS, EOS, EOS, EOS]],
    )
    assert out["loss_mask"].all()
    assert int(out["num_truncated"]) == 1
    for row, d in zip(out["input_ids"].tolist(), docs):
        assert row[: row.index(EOS)] == d[:4]


@pytest.mark.parametrize("fn", [pack, pad_each])
def test_packing_bad_seq_len(fn):
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        fn([[1]], seq_len=1, eos_id=EOS, **({"pad_id": PAD} if fn is pack else {}))


# ---------------------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------------------
def test_cache_key_and_hit(tmp_path):
    k = cache_key(a=1, b="x", c=[1, 2])
    assert len(k) == 16 and all(c in "0123456789abcdef" for c in k)
    assert k == cache_key(c=[1, 2], b="x", a=1)
    assert k != cache_key(a=2, b="x", c=[1, 2])
    calls = []

    def build():
        calls.append(1)
        return {"x": np.arange(6).reshape(2, 3), "m": np.ones(3, dtype=bool)}

    first = load_or_build(tmp_path, k, build)
    second = load_or_build(tmp_path, k, build)
    assert len(calls) == 1
    np.testing.assert_array_equal(first["x"], second["x"])
    assert second["m"].dtype == np.bool_
    assert sorted(os.listdir(tmp_path)) == [f"{k}.npz"]  # no temp files left
    (tmp_path / f"{k}.npz").write_bytes(b"corrupt")
    load_or_build(tmp_path, k, build)
    assert len(calls) == 2
    load_or_build(None, k, build)
    assert len(calls) == 3


# ---------------------------------------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------------------------------------
def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("k", [0, 3, 10, 23, 57])
def test_resumable_sampler_start_equals_skip(k):
    n = 10
    full = _take(iter(ResumableRandomSampler(n, seed=5)), k + 40)
    resumed = _take(iter(ResumableRandomSampler(n, seed=5, start=k)), 40)
    assert resumed == full[k:]
    # each epoch is a permutation of all rows
    for e in range(3):
        assert sorted(full[e * n : (e + 1) * n]) == list(range(n)) or len(full) < (e + 1) * n
    s = ResumableRandomSampler(n, seed=5)
    assert [s.index_at(i) for i in range(25)] == full[:25]


def test_resumable_sampler_ranks_partition_stream():
    n = 7
    full = _take(iter(ResumableRandomSampler(n, seed=1, start=4)), 30)
    r0 = _take(iter(ResumableRandomSampler(n, seed=1, start=4, rank=0, world_size=2)), 15)
    r1 = _take(iter(ResumableRandomSampler(n, seed=1, start=4, rank=1, world_size=2)), 15)
    assert r0 == full[0::2] and r1 == full[1::2]
    assert _take(iter(ResumableRandomSampler(n, seed=2)), 10) != _take(
        iter(ResumableRandomSampler(n, seed=1)), 10
    )


# ---------------------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------------------
def test_arithmetic_source():
    src = ArithmeticSource(n_digits=1, num_train=50, num_val=10, seed=0)
    assert isinstance(src.task, ArithmeticTask)
    assert len(list(src.documents("train"))) == 50 and len(list(src.documents("val"))) == 10
    assert src.fingerprint() == src.task.fingerprint()


def _write(p: Path, text: str) -> str:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_text_files_source_splits(tmp_path):
    paras = [f"paragraph {i}\nsecond line {i}" for i in range(40)]
    _write(tmp_path / "a.txt", "\n\n".join(paras[:20]))
    _write(tmp_path / "sub" / "b.txt", "\n\n  \n".join(paras[20:]) + "\n\n\n")
    src = TextFilesSource(str(tmp_path / "**" / "*.txt"), val_fraction=0.1)
    train, val = list(src.documents("train")), list(src.documents("val"))
    assert len(val) == 4 and len(train) == 36
    assert sorted(train + val) == sorted(paras)
    again = TextFilesSource([str(tmp_path / "a.txt"), str(tmp_path / "sub")], val_fraction=0.1)
    assert list(again.documents("val")) == val  # deterministic; dir == same files
    lines = TextFilesSource(str(tmp_path / "a.txt"), split_on="line", val_fraction=0.1)
    assert len(list(lines.documents("train"))) + len(list(lines.documents("val"))) == 40
    files = TextFilesSource(str(tmp_path / "**" / "*.txt"), split_on="file", val_fraction=0.5)
    assert len(list(files.documents("train"))) == 1 and len(list(files.documents("val"))) == 1
    assert src.task is None
    fp = src.fingerprint()
    assert fp == TextFilesSource(str(tmp_path / "**" / "*.txt"), val_fraction=0.1).fingerprint()
    assert fp != TextFilesSource(str(tmp_path / "**" / "*.txt"), val_fraction=0.2).fingerprint()


def test_text_files_missing_path_and_empty_glob(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'nope\.txt' does not exist \(cwd: .*\)"):
        TextFilesSource("nope.txt")
    with pytest.raises(FileNotFoundError, match=r"glob .*\*\.md' matched no files \(cwd: "):
        TextFilesSource(str(tmp_path / "*.md"))


def test_text_files_empty_corpus(tmp_path):
    src = TextFilesSource(_write(tmp_path / "empty.txt", "\n \n\n\t\n"))
    with pytest.raises(ValueError, match="corpus is empty: .*point `paths` at files containing text"):
        src.documents("train")


def _json_corpus(tmp_path: Path) -> dict[str, str]:
    tr = tmp_path / "train.jsonl"
    va = tmp_path / "val.jsonl"
    tr.write_text("".join(json.dumps({"text": f"train doc {i}", "id": i}) + "\n" for i in range(30)))
    va.write_text("".join(json.dumps({"text": f"val doc {i}", "id": i}) + "\n" for i in range(5)))
    return {"train": str(tr), "validation": str(va)}


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_dataset_source_json(tmp_path, streaming):
    files = _json_corpus(tmp_path)
    extra = {} if streaming else {"cache_dir": str(tmp_path / "hf_cache")}
    src = HFDatasetSource("json", data_files=files, streaming=streaming, max_train_documents=10, **extra)
    assert list(src.documents("train")) == [f"train doc {i}" for i in range(10)]
    assert list(src.documents("val")) == [f"val doc {i}" for i in range(5)]
    held = HFDatasetSource(
        "json",
        data_files={"train": files["train"]},
        val_split=None,
        max_val_documents=4,
        streaming=streaming,
        **extra,
    )
    assert list(held.documents("val")) == [f"train doc {i}" for i in range(4)]
    assert list(held.documents("train")) == [f"train doc {i}" for i in range(4, 30)]
    bad = HFDatasetSource("json", data_files=files, text_field="body", streaming=streaming, **extra)
    with pytest.raises(ValueError, match=r"text_field 'body' is not a column.*available columns: \[.*'text'"):
        list(bad.documents("train"))


def test_hf_dataset_source_text_loader(tmp_path):
    p = _write(tmp_path / "corpus.txt", "line one\n\nline two\nline three\n")
    src = HFDatasetSource("text", data_files={"train": p}, val_split=None, max_val_documents=1)
    assert list(src.documents("val")) == ["line one"]
    assert list(src.documents("train")) == ["line two", "line three"]
    assert src.task is None and src.fingerprint().startswith("hf_dataset:")


# ---------------------------------------------------------------------------------------------------------
# datamodule
# ---------------------------------------------------------------------------------------------------------
def _arith_dm(tmp_path, **kw) -> DLMDataModule:
    args = dict(
        source=ArithmeticSource(n_digits=2, num_train=2000, num_val=100, seed=0),
        tokenizer=CharTokenizer(ALPHA),
        seq_len=16,
        batch_size=32,
        cache_dir=str(tmp_path / "cache"),
    )
    args.update(kw)
    return DLMDataModule(**args)


def test_datamodule_arithmetic_end_to_end(tmp_path):
    dm = _arith_dm(tmp_path)
    assert dm.task is dm.source.task
    dm.setup("fit")
    dm.setup("fit")  # idempotent
    assert dm.num_train_rows == 2000 and dm.num_val_rows == 100
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "loss_mask"}
    assert batch["input_ids"].shape == (32, 16) and batch["input_ids"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.bool and batch["loss_mask"].all()
    for row in batch["input_ids"]:
        assert dm.task.is_valid(dm.tokenizer.decode_until_eos(row))
        assert row[-1].item() == dm.tokenizer.eos_token_id
    vals = list(dm.val_dataloader())
    assert sum(len(b["input_ids"]) for b in vals) == 100
    texts = [dm.tokenizer.decode(r) for b in vals for r in b["input_ids"]]
    assert texts == dm.source.documents("val")  # fixed order
    assert len(list(dm.val_dataloader())) == len(vals)  # finite and repeatable


def test_datamodule_packing_has_doc_ids(tmp_path):
    dm = _arith_dm(tmp_path, packing=True, seq_len=32, batch_size=8)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "loss_mask", "doc_ids"}
    assert batch["doc_ids"].dtype == torch.long and batch["doc_ids"].shape == (8, 32)
    assert (batch["doc_ids"][:, 0] == 0).all()
    vb = next(iter(dm.val_dataloader()))
    assert "doc_ids" in vb


def test_datamodule_uses_cache(tmp_path, monkeypatch):
    dm = _arith_dm(tmp_path)
    dm.setup()
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(files) == 2  # train + val
    dm2 = _arith_dm(tmp_path)

    def boom(split):
        raise AssertionError("documents() called despite a cache hit")

    monkeypatch.setattr(dm2.source, "documents", boom)
    dm2.setup()
    np.testing.assert_array_equal(dm.train_data["input_ids"], dm2.train_data["input_ids"])
    dm3 = _arith_dm(tmp_path, seq_len=24)
    dm3.setup()
    assert len(os.listdir(tmp_path / "cache")) == 4  # seq_len is part of the key


def test_datamodule_resume_position(tmp_path):
    dm = _arith_dm(tmp_path, batch_size=16)
    dm.setup()
    it = iter(dm.train_dataloader())
    stream = [next(it)["input_ids"] for _ in range(10)]
    # a fresh stream keeps going past an epoch (infinite)
    dm.trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=2, world_size=1, global_rank=0)
    it2 = iter(dm.train_dataloader())
    assert dm.train_sampler.start == 3 * 16 * 2
    for j in range(4):
        assert torch.equal(next(it2)["input_ids"], stream[6 + j])


def test_datamodule_train_loader_is_infinite_and_worker_independent(tmp_path):
    dm = _arith_dm(tmp_path, source=ArithmeticSource(n_digits=1, num_train=40, num_val=10), batch_size=16)
    dm.setup()
    it = iter(dm.train_dataloader())
    seq0 = [next(it)["input_ids"] for _ in range(8)]  # 128 samples > 40 rows: wraps epochs
    dmw = _arith_dm(
        tmp_path, source=ArithmeticSource(n_digits=1, num_train=40, num_val=10), batch_size=16, num_workers=2
    )
    dmw.setup()
    itw = iter(dmw.train_dataloader())
    seqw = [next(itw)["input_ids"] for _ in range(8)]
    del itw
    assert all(torch.equal(a, b) for a, b in zip(seq0, seqw))


def test_datamodule_lightning_resume_sees_same_batches(tmp_path):
    import lightning as L

    class Rec(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["input_ids"].clone())
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def trainer(max_steps):
        return L.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            accumulate_grad_batches=2,
            default_root_dir=str(tmp_path),
        )

    def dm():
        return _arith_dm(tmp_path, batch_size=8)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = Rec()
        trainer(4).fit(full, datamodule=dm())
        first = Rec()
        t1 = trainer(2)
        t1.fit(first, datamodule=dm())
        ckpt = str(tmp_path / "mid.ckpt")
        t1.save_checkpoint(ckpt)
        resumed = Rec()
        trainer(4).fit(resumed, datamodule=dm(), ckpt_path=ckpt)
    assert len(full.seen) == 8 and len(first.seen) == 4 and len(resumed.seen) == 4
    assert all(torch.equal(a, b) for a, b in zip(first.seen, full.seen[:4]))
    assert all(torch.equal(a, b) for a, b in zip(resumed.seen, full.seen[4:]))


def test_datamodule_too_few_rows(tmp_path):
    dm = _arith_dm(tmp_path, source=ArithmeticSource(n_digits=1, num_train=20, num_val=5), batch_size=64)
    with pytest.raises(ValueError, match=r"only 20 training rows .*batch_size=64: lower batch_size to <= 20"):
        dm.setup()


def test_datamodule_bad_seq_len(tmp_path):
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        _arith_dm(tmp_path, seq_len=1)


def test_datamodule_bad_tokenizer_ids(tmp_path):
    tok = CharTokenizer(ALPHA)
    tok.mask_token_id = tok.eos_token_id
    dm = _arith_dm(tmp_path, tokenizer=tok)
    with pytest.raises(ValueError, match="mask_token_id=.* equals eos_token_id.*distinct"):
        dm.setup()


def test_datamodule_empty_corpus_and_missing_path(tmp_path):
    src = TextFilesSource(_write(tmp_path / "empty.txt", "\n\n"))
    dm = DLMDataModule(src, ByteTokenizer(), seq_len=8, batch_size=1, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="corpus is empty"):
        dm.setup()
    # a single document leaves the val split empty
    one = TextFilesSource(_write(tmp_path / "one.txt", "just one paragraph"))
    dm = DLMDataModule(one, ByteTokenizer(), seq_len=8, batch_size=1, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="corpus is empty: the 'val' split.*val_fraction > 0"):
        dm.setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextFilesSource(str(tmp_path / "missing.txt"))


def test_datamodule_truncation_warns_once(tmp_path):
    with pytest.warns(
        UserWarning, match=r"2000 train and 100 val documents .*truncated.*raise seq_len"
    ) as rec:
        _arith_dm(tmp_path, seq_len=4).setup()
    assert len([w for w in rec if "truncated" in str(w.message)]) == 1


def test_datamodule_text_files_bytes_packed(tmp_path):
    text = "\n\n".join(f"The cat number {i} sat on the mat." for i in range(60))
    src = TextFilesSource(_write(tmp_path / "c.txt", text), val_fraction=0.1)
    dm = DLMDataModule(src, ByteTokenizer(), seq_len=64, batch_size=4, packing=True, cache_dir=None)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape == (4, 64) and "doc_ids" in b
    assert "cat number" in ByteTokenizer().decode(b["input_ids"][0])


def test_datamodule_hf_tokenizer_and_dataset(tmp_path):
    files = _json_corpus(tmp_path)
    tok = HFTokenizer(_save_tiny_hf_tokenizer(tmp_path / "tok"))
    # "train doc 3" -> all [UNK] for the tiny vocab, which is fine for the plumbing
    dm = DLMDataModule(
        HFDatasetSource("json", data_files=files),
        tok,
        seq_len=8,
        batch_size=4,
        packing=True,
        cache_dir=str(tmp_path / "c"),
    )
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].max().item() < tok.vocab_size
    assert dm.num_val_rows >= 1


# ---------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------
def _data_cfg(name: str, tmp_path: Path, **overrides):
    cfg = OmegaConf.merge(
        {"paths": {"cache_dir": str(tmp_path / "cache")}, "seed": 0},
        {"data": OmegaConf.load(CONF_DIR / f"{name}.yaml")},
        {"data": overrides},
    )
    return cfg.data


def test_config_arithmetic_default(tmp_path):
    dm = instantiate(_data_cfg("arithmetic", tmp_path))
    assert isinstance(dm, DLMDataModule)
    assert isinstance(dm.source, ArithmeticSource) and isinstance(dm.tokenizer, CharTokenizer)
    assert dm.seq_len == 16 and dm.batch_size == 64 and not dm.packing
    assert dm.cache_dir == str(tmp_path / "cache")
    assert dm.task.max_doc_len + 1 <= dm.seq_len
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape == (64, 16)
    vb = next(iter(dm.val_dataloader()))
    assert vb["input_ids"].shape == (64, 16)
    assert dm.num_train_rows == 20000 and dm.num_val_rows == 512


def test_config_text_files(tmp_path):
    with pytest.raises(Exception, match="(?i)missing"):
        instantiate(_data_cfg("text_files", tmp_path))
    p = _write(tmp_path / "t.txt", "\n\n".join(f"doc {i} " * 20 for i in range(30)))
    dm = instantiate(_data_cfg("text_files", tmp_path, source={"paths": p}, batch_size=2))
    assert isinstance(dm.tokenizer, ByteTokenizer) and dm.packing and dm.seq_len == 128
    dm.setup()
    assert "doc_ids" in next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("name", ["tinystories", "wikitext103", "fineweb_edu"])
def test_config_hub_datasets_instantiate_offline(tmp_path, monkeypatch, name):
    import datasets
    import transformers

    def no_network(*a, **k):
        raise AssertionError("network/hub touched at instantiation")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_network)
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    dm = instantiate(_data_cfg(name, tmp_path))
    assert isinstance(dm.source, HFDatasetSource) and isinstance(dm.tokenizer, HFTokenizer)
    assert dm.source.streaming and dm.packing and dm.seq_len == 512
    assert dm.source.max_train_documents is not None
    assert dm.tokenizer.name_or_path == "gpt2"
    repr(dm)
    if name == "fineweb_edu":
        assert dm.source.val_split is None
