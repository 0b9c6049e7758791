"""Attention-mask annealing (DiffuLLaMA): start the converted model causal and open it to bidirectional
attention over the first `steps` optimizer steps, so the pretrained AR model is not shocked by a full
bidirectional mask on step 0.

At step s the backbone's ``bidirectional_fraction`` is min(1, s / steps): query i may attend to keys
j <= i + ceil(fraction * (T - 1)) (see :func:`dlm.models.hf.annealed_mask`). The fraction is a function of
the global step alone, so a resumed run continues the same schedule. Validation during annealing uses the
mask of the current step (the model as it is being trained); after training the model is fully bidirectional.
DiffuLLaMA unmasks random upper-triangle entries with a growing probability; a deterministic widening window is
used here so that runs and resumes are reproducible without another random stream.
"""

from __future__ import annotations

import lightning as L


class AttentionAnnealing(L.Callback):
    def __init__(self, steps: int):
        if steps < 0:
            raise ValueError(f"attention annealing steps must be >= 0, got {steps}")
        self.steps = int(steps)

    def fraction(self, step: int) -> float:
        return 1.0 if self.steps == 0 else min(1.0, step / self.steps)

    @staticmethod
    def _backbone(pl_module):
        backbone = pl_module.backbone
        if not hasattr(backbone, "bidirectional_fraction"):
            raise TypeError(
                f"attention annealing needs a backbone with bidirectional_fraction (dlm.models.hf.HFCausalLM), "
                f"not {type(backbone).__name__}; drop callbacks.attention_annealing"
            )
        return backbone

    def on_fit_start(self, trainer, pl_module) -> None:
        self._backbone(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._backbone(pl_module).bidirectional_fraction = self.fraction(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._backbone(pl_module).bidirectional_fraction = 1.0
