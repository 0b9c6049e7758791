"""``torch.compile`` for a backbone, turned on by config: ``compile=<mode>`` in ``python -m dlm.train`` and
``python -m dlm.generate`` (``null``: eager, the default).

    compile_backbone(module.backbone, "reduce-overhead")

What is compiled: the backbone's forward, in place (``nn.Module.compile``), so ``state_dict()`` keys stay
unchanged (``torch.compile(module)`` would prefix them with ``_orig_mod.``): checkpoints of a compiled run load
into an uncompiled module and back, and a run resumes with or without compile.

What runs compiled: every backbone call without a growing KV cache, i.e. training steps, the samplers' denoiser
calls (one ``[B, T]`` shape for a whole generation: one graph) and calls with a static (preallocated) KV cache
(:mod:`dlm.models.kv_cache`: fixed shapes, buffers updated in place at static addresses, so CUDA graphs replay
them). The cached sampling paths (AR decoding, BD3-LM's block cache, ``ThresholdSampler(kv_cache="prefix")``: ``sampler.kv_cache``)
take a static cache when the backbone is compiled (``DiffusionLM.static_kv_cache``, default null = exactly
then; the dual cache, ``kv_cache="dual"``, always does). Calls with a growing cache (``DynamicCache``/``KVCache``, or ``use_cache=True`` without a cache) run
eagerly: their length changes every call (compiled, 5 tokens of AR decoding on the native backbone made 19
graphs), and the cache tensors they return are kept across calls, which CUDA graphs overwrite on the next replay.
``dynamic=None`` is Dynamo's automatic dynamic shapes: the first shape is compiled static, a second one
(another batch size or length) once more with that dimension symbolic, not once per shape. The backbones'
token-id range check (:func:`dlm.models.inputs.check_inputs`) is skipped while compiling: it reads values on
the host, which would split the graph around a sync and recompile per observed value.

CUDA graphs (``reduce-overhead``, ``max-autotune``): an output lives until the next call of the backbone. The
callers here consume it at once (log-probabilities and losses are new tensors); keep a ``.clone()`` if you
need one longer.
"""

from __future__ import annotations

from torch import nn

from dlm.config import ConfigError
from dlm.models.kv_cache import is_static_cache

# torch.compile's modes (see torch.compile); None means no compilation.
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_mode(mode: str | None) -> None:
    """Raise a ConfigError (a ValueError the CLIs report without a traceback) naming the valid modes unless
    ``mode`` is None or one of :data:`MODES`."""
    if mode is not None and mode not in MODES:
        raise ConfigError([f"compile={mode}: not a torch.compile mode; valid: null (eager), {', '.join(MODES)}"])


def uses_kv_cache(kwargs: dict) -> bool:
    """Whether a backbone call reads or fills a growing KV cache (one whose shapes change from one call to the
    next); a static cache (:func:`dlm.models.kv_cache.is_static_cache`) has fixed shapes and does not count."""

    cache = kwargs.get("past_key_values")
    if cache is not None:
        return not is_static_cache(cache)
    return bool(kwargs.get("use_cache"))


def compile_backbone(module: nn.Module, mode: str | None, dynamic: bool | None = None) -> nn.Module:
    """Compile ``module``'s forward in place with ``torch.compile(mode=mode, dynamic=dynamic)``; calls with a
    growing KV cache stay eager (see the module docstring). ``mode=None`` leaves it eager. Returns the same module."""
    check_mode(mode)
    if mode is None:
        return module
    module.compile(mode=mode, dynamic=dynamic)
    # nn.Module.compile stores the compiled __call__ in _compiled_call_impl (what __call__ runs when set);
    # route the growing-KV-cache calls around it to the eager one.
    compiled, eager = module._compiled_call_impl, module._call_impl

    def call(*args, **kwargs):
        return eager(*args, **kwargs) if uses_kv_cache(kwargs) else compiled(*args, **kwargs)

    module._compiled_call_impl = call
    return module


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None
