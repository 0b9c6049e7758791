"""BD3-LM training with the LM head at the masked x_t positions only (``vectorised_logits(at=masked)``): the same
rows, loss and gradients as the full [B, T, V] logits, with and without shift_logits (whose block starts are read
from the clean stream, so the rows must be reordered), for the native backbone and an HF Qwen3."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dlm.methods.bd3lm import BD3LM  # noqa: E402
from dlm.models import Transformer  # noqa: E402
from dlm.models.hf import HFCausalLM  # noqa: E402
from dlm.schedules import LinearSchedule  # noqa: E402

V, T, B = 64, 10, 3  # T = 10: not a multiple of the block sizes 3 and 4
TOKENIZER = SimpleNamespace(vocab_size=V, pad_token_id=0, eos_token_id=1, mask_token_id=V - 1)
MASK = V - 1
QWEN3 = dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, head_dim=32, vocab_size=V, max_position_embeddings=64)


def backbone(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "native":
        return Transformer(vocab_size=V, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return HFCausalLM(config=QWEN3, attn_implementation="sdpa", attention="bidirectional")


def bd3lm(arch: str, block_size: int, shift: bool, net: nn.Module | None = None) -> BD3LM:
    # eval: no dropout, so both passes see the same network
    return BD3LM(net or backbone(arch), TOKENIZER, LinearSchedule(), block_size=block_size, shift_logits=shift).eval()


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V - 1, (B, T), generator=g)
    loss_mask = torch.ones(B, T, dtype=torch.bool)
    loss_mask[1, -3:] = False  # a padded tail: never masked
    return {"input_ids": ids, "loss_mask": loss_mask}


def noisy(x0: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    masked = torch.rand(x0.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    masked[0, 0] = masked[0, 3] = masked[0, 4] = True  # block starts for L' = 1, 3, 4
    masked[2] = False  # a row with nothing masked
    return x0.masked_fill(masked, MASK), masked


def record_logits_at(module: nn.Module) -> list:
    asked: list = []
    module.register_forward_pre_hook(lambda mod, args, kwargs: asked.append(kwargs.get("logits_at")), with_kwargs=True)
    return asked


def loss_and_grads(model: BD3LM, b: dict, full_logits: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    if full_logits:  # the reference: every position's logits [B, T, V], the masked rows scored
        model.vectorised_logits = lambda xt, x0, doc_ids=None, at=None: BD3LM.vectorised_logits(model, xt, x0, doc_ids)
    try:
        loss = model.loss(b, generator=torch.Generator().manual_seed(7))["loss"]
    finally:
        model.__dict__.pop("vectorised_logits", None)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(model: BD3LM, b: dict) -> None:
    loss, grads = loss_and_grads(model, b, full_logits=False)
    ref_loss, ref_grads = loss_and_grads(model, b, full_logits=True)
    assert ref_loss > 0
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


ARCHS = ["native", "qwen3"]
SHIFTS = pytest.mark.parametrize("shift", [False, True], ids=["no_shift", "shift"])
BLOCKS = pytest.mark.parametrize("block_size", [1, 3, 4])


@BLOCKS
@SHIFTS
@pytest.mark.parametrize("arch", ARCHS)
def test_rows_at_the_masked_tokens_equal_the_full_logits(arch, shift, block_size):
    model = bd3lm(arch, block_size, shift)
    x0 = batch()["input_ids"]
    xt, masked = noisy(x0)
    asked = record_logits_at(model.backbone)
    with torch.no_grad():
        full = model.vectorised_logits(xt, x0)
        rows = model.vectorised_logits(xt, x0, at=masked)
    assert rows.shape == (int(masked.sum()), V)
    torch.testing.assert_close(rows, full[masked], atol=1e-5, rtol=1e-5)
    # the backbone ran its head at one source position per masked token, over [x_t ; (s ;) x_0]
    assert asked[0] is None and asked[1].shape == (B, 2 * T + shift) and int(asked[1].sum()) == int(masked.sum())
    if not shift:  # every prediction is read from the noisy stream
        assert torch.equal(asked[1][:, :T], masked) and not asked[1][:, T:].any()


@BLOCKS
@SHIFTS
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_gradients_match_the_full_logits_path(arch, shift, block_size):
    model = bd3lm(arch, block_size, shift)
    b = batch()
    asked = record_logits_at(model.backbone)
    assert_same_loss_and_grads(model, b)
    masked = model._diffusion_terms(b, torch.Generator().manual_seed(7))[1]  # the draws of both passes
    assert masked.any() and len(asked) == 3
    assert asked[0] is not None and int(asked[0].sum()) == int(masked.sum())  # the selected-head path was taken
    assert asked[1] is None  # the reference


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rows(arch):
    model = bd3lm(arch, 3, shift=False)
    b = batch()
    b["doc_ids"] = torch.tensor([0] * 4 + [1] * 5 + [2] * (T - 9)).expand(B, T)
    asked = record_logits_at(model.backbone)
    assert_same_loss_and_grads(model, b)
    assert asked[0] is not None
    x0 = b["input_ids"]
    xt, masked = noisy(x0)
    with torch.no_grad():
        full = model.vectorised_logits(xt, x0, b["doc_ids"])
        rows = model.vectorised_logits(xt, x0, b["doc_ids"], at=masked)
    torch.testing.assert_close(rows, full[masked], atol=1e-5, rtol=1e-5)


@SHIFTS
@pytest.mark.parametrize("arch", ARCHS)
def test_nothing_masked(arch, shift):
    model = bd3lm(arch, 4, shift)
    b = batch()
    b["loss_mask"] = torch.zeros_like(b["loss_mask"])  # nothing counted, so nothing is masked
    x0 = b["input_ids"]
    with torch.no_grad():
        assert model.vectorised_logits(x0, x0, at=torch.zeros_like(b["loss_mask"])).shape == (0, V)
    out = model.loss(b, generator=torch.Generator().manual_seed(7))
    assert float(out["loss"].detach()) == 0 and float(out["masked_frac"]) == 0
    out["loss"].backward()  # a step with nothing masked still backpropagates (zero gradients)
    assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)


class NoLogitsAt(nn.Module):
    """A backbone whose forward does not take logits_at."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, *, attn_mask=None, position_ids=None):
        return self.inner(input_ids, attn_mask=attn_mask, position_ids=position_ids)


@SHIFTS
def test_a_backbone_without_logits_at_falls_back_to_selecting(shift):
    plain, wrapped = bd3lm("native", 3, shift), bd3lm("native", 3, shift, net=NoLogitsAt(backbone("native")))
    assert plain.backbone_caps.logits_at and not wrapped.backbone_caps.logits_at
    x0 = batch()["input_ids"]
    xt, masked = noisy(x0)
    with torch.no_grad():
        rows = wrapped.vectorised_logits(xt, x0, at=masked)
        torch.testing.assert_close(rows, plain.vectorised_logits(xt, x0, at=masked), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rows, wrapped.vectorised_logits(xt, x0)[masked], atol=1e-5, rtol=1e-5)
