"""A published checkpoint layout: how a diffusion LM's own config.json and weight names map onto a transformers
class, both ways, and the streaming reader / sharded writer that use the mapping.

A :class:`PublishedLayout` states three things about one architecture's published folder:

- which ``config.json`` it is (``model_types``, :meth:`~PublishedLayout.matches`) and which of its features the
  transformers class can express (:meth:`~PublishedLayout.check` refuses the others, naming the field);
- ``config.json`` -> transformers config fields (:meth:`~PublishedLayout.hf_config`) and back
  (:meth:`~PublishedLayout.published_config`: the original keys kept, only geometry that changed rewritten);
- every published weight name -> a :class:`Target`: a transformers state-dict key and, for a fused transformers
  tensor (Qwen3-MoE's ``experts.gate_up_proj`` [E, 2I, H]), the slice one published tensor fills
  (:meth:`~PublishedLayout.names`). The same table reads and writes, so export is the exact inverse of load.

:func:`load_published_state` streams the safetensors shards (``model.safetensors.index.json`` or a single
``model.safetensors``) tensor by tensor into the meta-device model (``assign=True``: a whole tensor is used as read,
a fused one is allocated once and filled slice by slice), so a checkpoint is never held twice in host memory.
:func:`save_published_state` writes the layout back: the same names, dtypes, a sharded index, config.json.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlm.errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are read or written: recognising a layout (a plan) needs none
    import torch
    from torch import Tensor, nn


def _no_grad(fn):
    """torch.no_grad() around ``fn``, with torch imported at the call."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return run

WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
# Files of a published folder that save_published rewrites; every other file (tokenizer, generation_config.json,
# the authors' modeling/configuration *.py that auto_map names, README) is copied over unchanged.
REWRITTEN = ("config.json", WEIGHTS_INDEX, SINGLE_WEIGHTS)
# config.json keys that describe the file, not the architecture: never passed to the transformers config.
FILE_KEYS = ("architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
             "_name_or_path", "quantization_config")


class LayoutError(UserError, ValueError):
    """A folder that is not the published layout asked for, or weights that do not fit it (names them)."""


@dataclass(frozen=True)
class Target:
    """Where one published tensor lives in the transformers model: ``key`` of its state dict and, for a fused
    tensor, the ``index`` (a tuple of ints/slices) of the part this tensor is; None = the whole tensor."""

    key: str
    index: tuple | None = None


class PublishedLayout:
    """One architecture's published checkpoint layout (subclasses: one file per architecture in this package)."""

    name = "published"  # for messages, e.g. "LLaDA (GSAI-ML/LLaDA-8B-*)"
    model_types: tuple[str, ...] = ()  # config.json model_type values of this layout
    transformers_type = ""  # the transformers model_type it runs as

    # ---- what a subclass states ----------------------------------------------------------------------------------
    def matches(self, published: dict) -> bool:
        """Whether config.json is this layout (model_type, and where two layouts share one, the keys)."""
        return published.get("model_type") in self.model_types

    def check(self, published: dict) -> None:
        """Raise LayoutError for a feature the transformers class cannot express (named field, its value)."""

    def hf_config(self, published: dict) -> dict[str, Any]:
        """The transformers config (``model_type`` + fields) with exactly this checkpoint's mathematics."""
        raise NotImplementedError

    def published_config(self, original: dict, hf: dict) -> dict[str, Any]:
        """config.json for a model with transformers config ``hf``: ``original``'s keys (auto_map, architectures,
        mask_token_id ...) with the geometry fields that map one to one rewritten from ``hf``."""
        out = dict(original)
        for published_key, hf_key in self.geometry_fields().items():
            if hf_key in hf and published_key in out:
                out[published_key] = hf[hf_key]
        return out

    def geometry_fields(self) -> dict[str, str]:
        """published config key -> transformers config key, for the fields that map one to one."""
        return {}

    def names(self, hf: dict) -> dict[str, Target]:
        """Every published weight name of a model with transformers config ``hf`` -> its :class:`Target`."""
        raise NotImplementedError

    # ---- shared ----------------------------------------------------------------------------------------------
    def require(self, published: dict, source: str | Path) -> None:
        """A clear refusal of a config.json that is not this layout, then :meth:`check`."""
        if not self.matches(published):
            raise LayoutError(
                f"{source}: config.json has model_type={published.get('model_type')!r} "
                f"(architectures={published.get('architectures')}), not the {self.name} layout "
                f"(model_type {' or '.join(map(repr, self.model_types))}); pick the model config of that checkpoint"
            )
        self.check(published)

    def refuse(self, field: str, value: Any, why: str) -> None:
        raise LayoutError(f"{self.name} config.json field {field}={value!r} is not supported: {why}")

    def require_full_unscaled_attention(self, published: dict) -> None:
        """The Qwen-derived layouts (Dream, RND1): no sliding window, no RoPE scaling (what they were released with;
        the transformers class would otherwise run another attention)."""
        if published.get("use_sliding_window"):
            self.refuse("use_sliding_window", True, f"{self.name}'s attention is full (bidirectional)")
        if published.get("rope_scaling"):
            self.refuse("rope_scaling", published["rope_scaling"], f"{self.name} uses unscaled RoPE")


def hf_fields(config) -> dict[str, Any]:
    """A transformers config as a dict, with its aliases too (Qwen3-MoE's ``num_experts`` is an alias of
    ``num_local_experts``, which is what ``to_dict`` writes)."""
    fields = config.to_dict()
    for alias, real in getattr(config, "attribute_map", {}).items():
        if real in fields:
            fields.setdefault(alias, fields[real])
    return fields


def architecture_fields(published: dict) -> dict[str, Any]:
    """config.json without the keys that describe the file (architectures, auto_map, dtype ...)."""
    return {k: v for k, v in published.items() if k not in FILE_KEYS}


# ---- reading -------------------------------------------------------------------------------------------------
def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LayoutError(f"{folder}: no config.json; model.pretrained must be a published checkpoint folder or hub id")
    return json.loads(path.read_text())


def resolve_folder(pretrained: str | Path, weights: bool = True) -> Path:
    """A local folder for ``pretrained``: the folder itself, or the hub snapshot (downloaded unless offline, where
    the hub cache must hold it). ``weights=False`` fetches config.json only."""
    path = Path(str(pretrained)).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(pretrained), allow_patterns=None if weights else ["config.json"]))
    except Exception as err:  # offline and not cached, no such repo, ...: one line naming the fix
        raise LayoutError(
            f"model.pretrained={pretrained}: not a local folder and not available from the hub here ({err}); "
            "pass the folder of a downloaded checkpoint"
        ) from err


def _hub_cache_folder(repo_id: str) -> Path:
    """Where the hub cache keeps a model repo: huggingface_hub's layout (HF_HUB_CACHE, else HF_HOME/hub, HF_HOME
    defaulting to $XDG_CACHE_HOME/huggingface), read without importing it."""
    import os

    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or Path(home) / "hub"
    return Path(hub).expanduser() / ("models--" + repo_id.replace("/", "--"))


def cached_config(pretrained: str) -> dict | None:
    """A checkpoint's config.json from a local folder or the hub cache (never the network), else None."""
    path = Path(str(pretrained)).expanduser()
    if path.is_dir():
        return read_config(path) if (path / "config.json").is_file() else None
    if not _hub_cache_folder(str(pretrained)).is_dir():  # nothing cached: no lookup (huggingface_hub: a slow import)
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(pretrained), "config.json")
    except Exception:  # not a repo id
        return None
    return json.loads(Path(found).read_text()) if isinstance(found, str) else None


def shard_files(folder: Path) -> dict[str, list[str]]:
    """shard file -> the weight names it holds, from the index (or the single weights file)."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        return shards
    single = folder / SINGLE_WEIGHTS
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {SINGLE_WEIGHTS: list(f.keys())}
    raise LayoutError(f"{folder}: no {WEIGHTS_INDEX} or {SINGLE_WEIGHTS} (published weights are safetensors)")


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _checked_shards(layout: PublishedLayout, folder: Path, table: dict[str, Target]) -> dict[str, list[str]]:
    """The shards' weight names, refused by name where they do not match the layout's table."""
    shards = shard_files(folder)
    unexpected = sorted(n for names in shards.values() for n in names if n not in table)
    if unexpected:
        raise LayoutError(f"{folder}: weights that the {layout.name} layout does not have: {_listing(unexpected)}")
    present = {n for names in shards.values() for n in names}
    missing = sorted(set(table) - present)
    if missing:
        raise LayoutError(f"{folder}: the {layout.name} layout's weights missing from the checkpoint: {_listing(missing)}")
    return shards


@_no_grad
def load_published_state(model: nn.Module, layout: PublishedLayout, folder: Path, hf: dict,
                         dtype: torch.dtype | None = None) -> None:
    """Stream ``folder``'s shards into ``model`` (built on the meta device): every published name through
    ``layout.names(hf)``; ``dtype`` None keeps each tensor's published dtype. Missing or unexpected weights and
    shape mismatches raise LayoutError naming them."""
    import torch
    from safetensors import safe_open

    table = layout.names(hf)
    params = dict(model.named_parameters(remove_duplicate=False))
    shards = _checked_shards(layout, folder, table)
    state: dict[str, Tensor] = {}
    for shard, names in shards.items():
        with safe_open(str(folder / shard), framework="pt") as f:
            for name in names:
                tensor = f.get_tensor(name)
                if dtype is not None:
                    tensor = tensor.to(dtype)
                target = table[name]
                whole = params[target.key]
                want = tuple(whole[target.index].shape) if target.index is not None else tuple(whole.shape)
                if tuple(tensor.shape) != want:
                    raise LayoutError(f"{folder}: {name} has shape {tuple(tensor.shape)}, the config says {want}")
                if target.index is None:
                    state[target.key] = tensor
                else:  # a part of a fused tensor: allocated once, in the dtype of its first part
                    if target.key not in state:
                        state[target.key] = torch.empty(whole.shape, dtype=tensor.dtype)
                    state[target.key][target.index] = tensor
    result = model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # a transformers parameter no published name maps to: a layout bug, say which
        raise LayoutError(f"{layout.name}: transformers parameters not filled by the checkpoint: {_listing(left)}"
                          f" (unexpected keys {_listing(result.unexpected_keys)})")
    materialize_buffers(model)


@_no_grad
def load_published_into(model: nn.Module, layout: PublishedLayout, folder: Path, hf: dict) -> None:
    """Copy ``folder``'s weights into an already built ``model`` (real, or ZeRO-3 partitioned parameters), one
    transformers parameter at a time: it is gathered whole (dlm.parallel.params.gathered: a no-op when not
    partitioned), every published tensor of it is written (rank 0's writes kept and scattered back), released.
    Peak memory is one parameter (a fused expert tensor) beyond the rank's partition."""
    from contextlib import ExitStack

    from safetensors import safe_open

    from dlm.parallel.params import gathered

    table = layout.names(hf)
    shards = _checked_shards(layout, folder, table)
    shard_of = {name: shard for shard, names in shards.items() for name in names}
    params = dict(model.named_parameters(remove_duplicate=False))
    parts: dict[str, list[str]] = {}
    for name, target in table.items():
        parts.setdefault(target.key, []).append(name)
    with ExitStack() as stack:
        files = {shard: stack.enter_context(safe_open(str(folder / shard), framework="pt")) for shard in shards}
        for key, names in parts.items():
            param = params[key]
            with gathered([param], modifier_rank=0):
                for name in names:
                    tensor = files[shard_of[name]].get_tensor(name)
                    index = table[name].index
                    view = param.data if index is None else param.data[index]
                    if tuple(tensor.shape) != tuple(view.shape):
                        raise LayoutError(f"{folder}: {name} has shape {tuple(tensor.shape)}, the config says "
                                          f"{tuple(view.shape)}")
                    view.copy_(tensor.to(view.dtype))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def materialize_buffers(model: nn.Module) -> None:
    """Buffers left on the meta device (RoPE ``inv_freq``: computed, not stored) rebuilt on the CPU from a fresh
    module of the same class and config."""
    import torch
    from torch import Tensor, nn

    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not meta:
            continue
        if not hasattr(module, "config"):
            raise LayoutError(f"cannot rebuild the buffers {meta} of {type(module).__name__} (no config)")
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for name, buffer in fresh.named_buffers(recurse=False):
            module.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
        for name, value in vars(fresh).items():  # e.g. attention_scaling, computed with inv_freq
            if not name.startswith("_") and not isinstance(value, (Tensor, nn.Module)):
                setattr(module, name, value)


# ---- writing -------------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_published_state(layout: PublishedLayout, hf_state: dict[str, Tensor], hf: dict, original: dict,
                         out: str | Path, source: Path | None = None, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write ``hf_state`` (transformers keys) as the published layout in ``out``: weight names and dtypes of the
    layout, safetensors shards of at most ``max_shard_bytes`` with ``model.safetensors.index.json`` (one file
    ``model.safetensors`` when it fits), config.json = ``original`` with changed geometry rewritten, and every
    other file of ``source`` (tokenizer, generation config, the authors' code) copied."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for name, target in layout.names(hf).items():
        if target.key not in hf_state:
            raise LayoutError(f"export: no transformers weight {target.key} for the published {name}")
        whole = hf_state[target.key].detach()
        # a fused tensor's parts are cloned: safetensors stores each tensor on its own storage
        tensors[name] = (whole[target.index].clone() if target.index is not None else whole).cpu().contiguous()
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():  # in the layout's order (by layer), as the authors' shards run
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in out.glob("model-*-of-*.safetensors"):
        stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_WEIGHTS), metadata={"format": "pt"})
        (out / WEIGHTS_INDEX).unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (out / SINGLE_WEIGHTS).unlink(missing_ok=True)
    config = layout.published_config(original, hf)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1:  # the dtype field says what the shards hold (a run may train in another dtype)
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = _dtype_name(next(iter(dtypes)))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if source is not None and Path(source).resolve() != out.resolve():
        for path in Path(source).iterdir():
            if path.is_file() and path.name not in REWRITTEN and not path.name.endswith(".safetensors"):
                shutil.copy2(path, out / path.name)
    return out
