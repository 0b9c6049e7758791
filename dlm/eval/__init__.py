"""Evaluation through third-party harnesses.

`dlm.eval.lm_eval_adapter` registers the model type ``dlm`` with EleutherAI's lm-evaluation-harness
(``pip install lm-eval``); import it (or run ``python -m dlm.lm_eval ...``) before asking lm_eval for
``--model dlm``. Nothing here imports lm_eval at package import time.
"""

__all__ = ["lm_eval_adapter"]
