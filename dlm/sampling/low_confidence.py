"""LLaDA's low-confidence remasking, under its paper's name.

Each step predicts every masked position (greedy by default; temperature / top-k / top-p sample instead),
scores it by the model probability of the predicted token, and commits the most confident ones; the number
committed splits each row's masks evenly over the steps. With ``block_length`` it decodes semi-autoregressively,
block by block. It is :class:`~dlm.sampling.confidence.ConfidenceSampler`: the confidence-ordered loop lives
there, shared with the margin, entropy, random-order and threshold samplers.
"""

from __future__ import annotations

from dlm.sampling.confidence import ConfidenceSampler

__all__ = ["LowConfidenceSampler"]


class LowConfidenceSampler(ConfidenceSampler):
    """Commit the most confident predictions first (LLaDA, Nie et al. 2025)."""
