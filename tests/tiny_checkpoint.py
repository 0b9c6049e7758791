"""A tiny local HF checkpoint with its own tokenizer (what a hub model folder holds), for the tests of what a
checkpoint brings (dlm/conventions.py) and of loading a model without a run folder (dlm.run.load_model)."""

from __future__ import annotations

from pathlib import Path

# Characters of the embedded data (brackets, arithmetic) and of short English prompts, one token each.
CHARS = list("()[]0123456789+= abcdefghijklmnopqrstuvwxyz:\n")
SPECIALS = ["<unk>", "<eos>"]
MASK = "<|mask|>"  # added by dlm's HFTokenizer (the tokenizer has none): the first id after the vocabulary
MASK_ID = len(SPECIALS) + len(CHARS)
# A minimal chat template (an instruct checkpoint's tokenizer carries one): "<role>:<content>\n" per turn.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def write_tiny_checkpoint(folder: Path, chat: bool = False) -> Path:
    """A 2-layer Qwen3 (vocab 64, random weights) and a character tokenizer saved together in ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = Qwen3Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, intermediate_size=64, vocab_size=64, max_position_embeddings=128,
                         tie_word_embeddings=True)
    Qwen3ForCausalLM(config).save_pretrained(str(folder))
    return folder


def conventions_override(folder: Path, **fields) -> str:
    """``+model.conventions={...}`` for qwen3_tiny pointed at ``folder`` (its tokenizer, mask token and id)."""
    values = {"tokenizer": str(folder), "mask_token": MASK, "mask_token_id": MASK_ID, **fields}
    inner = ", ".join(f"{k}: {_value(v)}" for k, v in values.items())
    return "+model.conventions={" + inner + "}"


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    return "'" + str(v) + "'"


def tiny_model_overrides(folder: Path, **conventions) -> list[str]:
    """The overrides that load the checkpoint in ``folder`` as model=qwen3_tiny with its conventions."""
    return ["model=qwen3_tiny", f"model.pretrained={folder}", "model.config=null",
            conventions_override(folder, **conventions)]
