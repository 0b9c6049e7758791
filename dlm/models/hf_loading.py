"""Loading a transformers model for the HF wrappers (causal and masked LMs), and growing its vocabulary: from a
checkpoint or a config, with the checkpoint's geometry and random weights (``load_weights=False``), and under
DeepSpeed ZeRO-3 (partitioned parameters) as well as plain ones."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dlm.config_values import to_plain
from dlm.models.hf_geometry import pretrained_geometry
from dlm.parallel.params import gathered, shape

# transformers is imported where a model is loaded: start-up of everything that does not load one.


def _plain_dict(config: Any) -> dict[str, Any]:
    """A Hydra DictConfig (or any mapping) as a plain, recursively converted dict."""
    return dict(to_plain(config))


def _resolve_dtype(torch_dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype) or torch_dtype == "auto":
        return torch_dtype
    dtype = getattr(torch, str(torch_dtype).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch_dtype {torch_dtype!r}; use e.g. float32, bfloat16, float16 or auto")
    return dtype


def load_hf_model(
    auto_class, pretrained: str | None, config: Any, *, attn_implementation: str, torch_dtype: str | None,
    trust_remote_code: bool, owner: str, example_types: str, load_weights: bool = True,
    quantization_config: Any = None,
) -> nn.Module:
    """A transformers model from a checkpoint (``pretrained``: hub id or folder; ``config`` fields override its
    config before the weights load) or from ``config`` alone (``model_type`` + fields, random init).
    ``load_weights=False`` with ``pretrained``: the checkpoint's geometry (read offline for the known hub ids),
    ``config`` fields over it, random init — e.g. a 2-layer moe30b-shaped model for a throughput check."""
    from transformers import AutoConfig

    if pretrained is not None and not load_weights:
        geometry = pretrained_geometry(pretrained)
        overrides = _plain_dict(config) if config is not None else {}
        if "num_hidden_layers" in overrides:  # a per-layer list derived from the depth: re-derived for the new one
            geometry.pop("layer_types", None)
        config, pretrained = {**geometry, **overrides}, None

    if pretrained is None and config is None:
        raise ValueError(
            f"{owner} needs a model: set model.pretrained (hub id or local folder) "
            "or model.config (a dict with model_type and its fields)"
        )
    overrides = _plain_dict(config) if config is not None else {}
    model_type = overrides.pop("model_type", None)
    load_kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
    dtype = _resolve_dtype(torch_dtype)
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    if quantization_config is not None:  # QLoRA (dlm.models.lora): quantized as it loads, onto this rank's GPU
        if pretrained is None:
            raise ValueError("model.lora.quantize=4bit quantizes pretrained weights as they load: set model.pretrained")
        import os

        load_kwargs.update(quantization_config=quantization_config,
                           device_map={"": torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))})
    if pretrained is not None:
        hf_config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code, **overrides)
        if model_type is not None and model_type != hf_config.model_type:
            raise ValueError(
                f"model.config.model_type={model_type!r} does not match the checkpoint's "
                f"{hf_config.model_type!r} ({pretrained}); drop model_type from model.config"
            )
        return auto_class.from_pretrained(
            pretrained, config=hf_config, trust_remote_code=trust_remote_code, **load_kwargs
        )
    if model_type is None:
        raise ValueError(f"model.config needs a model_type (e.g. {example_types})")
    hf_config = AutoConfig.for_model(model_type, **overrides)
    return auto_class.from_config(hf_config, trust_remote_code=trust_remote_code, **load_kwargs)


def _rows(weight: Tensor) -> int:
    """Rows of an embedding weight (of the whole weight, also when it is a ZeRO-3 partition)."""
    return int(shape(weight)[0])


@torch.no_grad()
def grow_vocab(hf_model: nn.Module, vocab_size: int) -> None:
    """Resize the embedding (and an untied output layer) to vocab_size rows; new rows are the mean of the old
    ones, so a new mask token does not start as a random vector. Under ZeRO-3 (partitioned parameters, loaded
    with a live ``HfDeepSpeedConfig``) the rows are read and written gathered, rank 0's writes kept."""
    emb = hf_model.get_input_embeddings().weight
    old = _rows(emb)
    out = hf_model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    with gathered([emb] + ([] if out is None or tied else [out.weight, getattr(out, "bias", None)])):
        old_out = None if out is None or tied else (out.weight[:old].mean(0), getattr(out, "bias", None))
        if old_out is not None and old_out[1] is not None:
            old_out = (old_out[0], old_out[1][:old].mean())
    hf_model.resize_token_embeddings(vocab_size, mean_resizing=False)
    emb = hf_model.get_input_embeddings().weight
    out = hf_model.get_output_embeddings()
    with gathered([emb] + ([] if out is None else [out.weight, getattr(out, "bias", None)]), modifier_rank=0):
        emb[old:] = emb[:old].mean(0)
        if old_out is not None and out is not None and out.weight is not emb:
            out.weight[old:] = old_out[0]
            if old_out[1] is not None and getattr(out, "bias", None) is not None:
                out.bias[old:] = old_out[1]
