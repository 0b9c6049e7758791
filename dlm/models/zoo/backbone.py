"""``PublishedDLM``: an HFCausalLM whose weights are read from (and written back to) a diffusion LM's own published
checkpoint layout, without the authors' remote code.

transformers cannot read these folders itself (config.json's ``model_type`` - ``llada``, ``Dream``, ``rnd1`` - is
unknown to it without ``trust_remote_code``), so the backbone reads config.json, maps it through its
:class:`~dlm.models.zoo.layout.PublishedLayout` to the transformers config with the same mathematics, builds that
model on the meta device and streams the shards into it renamed (dlm/models/zoo/layout.py). Everything after that
is HFCausalLM's: bidirectional conversion, masks, KV caches, ``logits_at``, router statistics, ZeRO paths.
:meth:`PublishedDLM.save_published` writes the model back in the published layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dlm.models.hf import HFCausalLM
from dlm.models.hf_loading import _plain_dict, _resolve_dtype, load_hf_model
from dlm.models.zoo.layout import (
    PublishedLayout,
    cached_config,
    hf_fields,
    load_published_into,
    load_published_state,
    read_config,
    resolve_folder,
    save_published_state,
)


class PublishedDLM(HFCausalLM):
    """A published diffusion LM (LLaDA, LLaDA-MoE, Dream, RND1) on a transformers class, bidirectional.

    Args:
        layout: the checkpoint's :class:`PublishedLayout` (e.g. ``dlm.models.zoo.LLaDALayout``).
        pretrained: hub id or local folder of the published checkpoint (its config.json and safetensors shards).
        config: transformers config fields over the mapped ones (e.g. ``{num_hidden_layers: 2}`` with
            ``load_weights: false``); alone (no ``pretrained``): that transformers model, random (plans).
        torch_dtype: None or ``auto`` keeps the published dtype of every tensor; a dtype casts while streaming.
        Other arguments: :class:`~dlm.models.hf.HFCausalLM`'s.
    """

    def __init__(self, layout: PublishedLayout, pretrained: str | None = None, config: dict | None = None,
                 **kwargs: Any):
        if not isinstance(layout, PublishedLayout):
            raise TypeError(f"layout must be a PublishedLayout (e.g. dlm.models.zoo.LLaDALayout), got {layout!r}")
        # set before nn.Module.__init__ (plain attributes): HFCausalLM's __init__ calls _load_model
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "published_config", None)
        object.__setattr__(self, "published_source", None)
        super().__init__(pretrained=pretrained, config=config, **kwargs)

    def _load_model(self, auto_class, pretrained, config, *, attn_implementation: str, torch_dtype, trust_remote_code,
                    load_weights: bool, quantization_config=None):
        if quantization_config is not None:
            from dlm.models.zoo.layout import LayoutError

            raise LayoutError(f"model.lora.quantize: a published {self.layout.name} checkpoint loads through its own "
                              "layout, which has no 4-bit path yet; use LoRA on the 16-bit model (drop "
                              "model.lora.quantize)")
        overrides = _plain_dict(config) if config is not None else {}
        if pretrained is None:  # a transformers config alone (a plan builds the mapped geometry on the meta device)
            return super()._load_model(auto_class, None, config, attn_implementation=attn_implementation,
                                       torch_dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                       load_weights=load_weights)
        if overrides.get("model_type") not in (None, self.layout.transformers_type):
            raise ValueError(f"model.config.model_type={overrides['model_type']!r}: the {self.layout.name} layout runs "
                             f"as {self.layout.transformers_type!r}; drop model_type from model.config")
        overrides.pop("model_type", None)
        if not load_weights:  # the published geometry, random weights: config.json only (or the known geometry)
            published = cached_config(pretrained)
            if published is None:
                from dlm.models.hf_geometry import pretrained_geometry

                geometry = pretrained_geometry(pretrained)
            else:
                self.layout.require(published, pretrained)
                geometry = self.layout.hf_config(published)
                object.__setattr__(self, "published_config", published)
                object.__setattr__(self, "published_source", _folder_or_none(pretrained))
            return load_hf_model(auto_class, None, {**geometry, **overrides}, attn_implementation=attn_implementation,
                                 torch_dtype=torch_dtype, trust_remote_code=False, owner=type(self).__name__,
                                 example_types=self.layout.transformers_type)
        from transformers import AutoConfig
        from transformers.integrations import is_deepspeed_zero3_enabled

        folder = resolve_folder(pretrained)
        published = read_config(folder)
        self.layout.require(published, folder)
        hf = {**self.layout.hf_config(published), **overrides}
        hf_config = AutoConfig.for_model(hf.pop("model_type"), **hf)
        dtype = _resolve_dtype(torch_dtype)
        dtype = None if dtype in (None, "auto") else dtype
        if is_deepspeed_zero3_enabled():
            # under a live HfDeepSpeedConfig transformers builds the model inside deepspeed.zero.Init (each rank
            # holds its partitions); the weights are then written one gathered parameter at a time
            published_dtype = _resolve_dtype(published.get("torch_dtype") or published.get("dtype") or "float32")
            model = auto_class.from_config(hf_config, attn_implementation=attn_implementation,
                                           dtype=dtype or published_dtype)
            load_published_into(model, self.layout, folder, hf_fields(model.config))
        else:  # the meta device, then each tensor assigned as read: one copy of the checkpoint in host memory
            with torch.device("meta"):
                model = auto_class.from_config(hf_config, attn_implementation=attn_implementation)
            load_published_state(model, self.layout, folder, hf_fields(model.config), dtype=dtype)
        object.__setattr__(self, "published_config", published)
        object.__setattr__(self, "published_source", folder)
        return model

    def save_published(self, out: str | Path, state: dict[str, Tensor] | None = None, tokenizer=None,
                       max_shard_bytes: int = 5 * 1024**3) -> Path:
        """Write this model in its published layout to ``out`` (config.json with the original keys, the published
        weight names and dtypes, a sharded index, the source folder's tokenizer and code files). ``state``:
        transformers-keyed weights to write instead of the live ones (an export from a run's checkpoint);
        ``tokenizer``: one to save over the copied files (a run's, when it differs from the checkpoint's)."""
        if self.published_config is None:
            raise ValueError(f"{self.layout.name}: no published config.json known for this model (built from a "
                             "transformers config alone); load it from a published checkpoint folder first")
        state = self.hf_model.state_dict() if state is None else state
        hf = hf_fields(self.hf_model.config)
        hf["vocab_size"] = int(state["model.embed_tokens.weight"].shape[0])
        out = save_published_state(self.layout, state, hf, self.published_config, out,
                                   source=self.published_source, max_shard_bytes=max_shard_bytes)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(out)
        return out


def _folder_or_none(pretrained: str) -> Path | None:
    """The local folder holding ``pretrained``'s files (a folder, or the hub snapshot in the cache), else None."""
    path = Path(str(pretrained)).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(pretrained), "config.json")
    except Exception:
        return None
    return Path(found).parent if isinstance(found, str) else None
