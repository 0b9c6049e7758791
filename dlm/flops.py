"""Model FLOPs of the training forwards, for MFU (model FLOPs utilisation), torchtitan's convention.

Per backbone position: ``6 N + 12 L d T`` with a backward pass, ``2 N + 4 L d T`` without, where N counts the
parameters a token passes through as matrix products (MoE: the routed experts' active share; the input embedding
is a lookup and left out, the output projection counts, tied or not), L the layers, d the model width and T the
length of that forward's sequence (attention scores and values, causal or not). The positions are counted where
they happen, by a hook on the backbone: a family that runs it on [x_t ; x_0] (BD3-LM), unrolls it (SUNDAE) or
adds a time token (DiffusionBERT) is counted as it runs, with no per-family factor. "Model" FLOPs: what a plain
implementation computes; dlm's LM head at the masked positions only does less work than counted, as activation
recomputation does more.

Used by ``ThroughputLogger`` (``train/tflops``, ``train/mfu``: peak ``peak_tflops`` per device, or for a
recognised CUDA device its dense bf16 peak, :data:`PEAK_BF16_TFLOPS`; nothing on a CPU unless given) and by the
``dry_run=true`` plan (:func:`flops_per_token`, from the family's :class:`TrainingLayout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the functions that take modules: a plan (dry_run) counts without it
    import torch
    from torch import nn

# Dense bf16 tensor-core peaks (TFLOP/s per device) from the vendors' datasheets; matched against the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def device_peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a recognised CUDA device, else None."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def _embeddings(backbone: nn.Module) -> tuple[nn.Parameter | None, nn.Parameter | None]:
    """(input embedding weight, output projection weight) of a native or HF backbone."""
    model = getattr(backbone, "hf_model", backbone)
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else getattr(backbone, "tok_emb", None)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else getattr(backbone, "lm_head", None)
    return getattr(emb, "weight", None), getattr(head, "weight", None)


def backbone_geometry(backbone: nn.Module) -> tuple[int, int, int]:
    """(N matmul parameters per position, layers, width) of a native Transformer or an HF wrapper."""
    from dlm.models.moe import count_active_parameters
    from dlm.parallel.params import numel

    emb, head = _embeddings(backbone)
    n = count_active_parameters(backbone)
    if emb is not None:
        n -= numel(emb)  # a lookup, not a product
    if head is not None and emb is not None and head is emb:
        n += numel(head)  # tied: the same matrix is also the output projection, a product
    cfg = getattr(getattr(backbone, "hf_model", None), "config", None)
    if cfg is not None:
        text = cfg.get_text_config()
        layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0)
        width = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)
    else:  # the native Transformer (module attributes: right under ZeRO-3 partitioning too)
        layers = len(getattr(backbone, "blocks", []))
        width = getattr(getattr(backbone, "tok_emb", None), "embedding_dim", 0)
    return int(n), int(layers), int(width)


def per_position(n: int, layers: int, width: int, seq_len: int, backward: bool = True) -> float:
    """Model FLOPs of one backbone position in a sequence of ``seq_len``: 6N + 12 L d T, a third without backward."""
    k = 3 if backward else 1  # a backward pass costs twice the forward
    return k * (2 * n + 4 * layers * width * seq_len)


@dataclass(frozen=True)
class TrainingLayout:
    """How a training step runs the backbone over a row of T tokens: ``forwards`` forwards (with backward), each over
    ``seq_multiple`` x T positions (BD3-LM: one over [x_t ; x_0], 2T; SUNDAE: one per unrolled step). A family
    declares it as ``training_layout:`` in its conf/method yaml, from its own fields, so that the plan reads it
    without importing the family (a LightningModule: seconds of start-up); without one, one forward over T.
    tests/test_flops.py checks each family's declaration against the FLOPs counted in a training step."""

    forwards: int = 1
    seq_multiple: int = 1

    @classmethod
    def of(cls, method_cfg) -> TrainingLayout:
        """The layout that a method config (``cfg.method``) declares."""
        declared = method_cfg.get("training_layout") if method_cfg is not None else None
        return cls(**declared) if declared else cls()


def flops_per_token(backbone: nn.Module, seq_len: int, layout: TrainingLayout = TrainingLayout()) -> float:
    """Training model FLOPs per data token of a family whose step has ``layout``."""
    return geometry_flops_per_token(*backbone_geometry(backbone), seq_len, layout)


def geometry_flops_per_token(n: int, layers: int, width: int, seq_len: int,
                             layout: TrainingLayout = TrainingLayout()) -> float:
    """:func:`flops_per_token` from the geometry (:func:`backbone_geometry`, or dlm.param_count's without a model)."""
    stretch = int(layout.seq_multiple)
    return int(layout.forwards) * stretch * per_position(n, layers, width, seq_len * stretch)


class FlopCounter:
    """Counts the model FLOPs of the training forwards of ``backbone`` (a forward pre-hook) into ``flops``."""

    def __init__(self, backbone: nn.Module):
        self.n, self.layers, self.width = backbone_geometry(backbone)
        self.flops = 0.0
        import torch

        self._grad_enabled = torch.is_grad_enabled
        # runs before a compiled backbone's graph, not traced into it
        self._handle = backbone.register_forward_pre_hook(torch.compiler.disable(self._count))

    def per_position(self, seq_len: int, backward: bool) -> float:
        return per_position(self.n, self.layers, self.width, seq_len, backward)

    def _count(self, module: nn.Module, args: tuple) -> None:
        if not module.training or not args:
            return
        ids = args[0]
        self.flops += ids.numel() * self.per_position(ids.shape[-1], self._grad_enabled())

    def remove(self) -> None:
        self._handle.remove()
