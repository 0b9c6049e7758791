"""`python -m dlm.lm_eval ...`: lm-evaluation-harness's own CLI with the model type ``dlm`` registered.

    python -m dlm.lm_eval --model dlm --model_args run=runs/mdlm-tiny/<time>,mc_num=8 \
        --tasks my_task --include_path path/to/tasks --device cpu --batch_size 16

Every argument is lm_eval's (`lm_eval --help`; `python -m dlm.lm_eval ls tasks` works too). lm_eval 0.4.x looks
models up only in its own registry and loads no plugin entry points for models, so the plain ``lm_eval``
command does not know ``dlm``; this wrapper imports :mod:`dlm.lm_eval_model` (which registers it) and
then hands the same arguments to lm_eval's CLI. model_args are documented in that module.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(f"lm-evaluation-harness is not installed ({err}); pip install 'lm-eval==0.4.13'") from err
    import lm_eval.models  # noqa: F401  (lm_eval's own models stay available beside dlm)

    import dlm.lm_eval_model  # noqa: F401  (registers --model dlm)
    from dlm.errors import user_errors

    if argv is not None:
        sys.argv = ["lm-eval", *argv]
    else:
        sys.argv[0] = "lm-eval"
    with user_errors():  # a bad run= or model_arg: one line, exit 2
        cli_evaluate()


if __name__ == "__main__":
    main()
