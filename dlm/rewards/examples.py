"""A TRL-style reward function, the default of ``conf/reward/function.yaml`` and a template for your own."""

from __future__ import annotations


def completion_length(prompts, completions, **columns) -> list[float]:
    """The length of each completion in characters (stripped): a sanity-check reward (RL should lengthen output)."""
    return [float(len(c.strip())) for c in completions]
