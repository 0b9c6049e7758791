"""`python -m dlm.consolidate <run_dir> [--ckpt last|best|PATH] [--out DIR] [--raw]`: a run's checkpoint (DeepSpeed
ZeRO folder or Lightning file) as an HF-format folder that transformers and dlm load (dlm/parallel/export.py)."""

from __future__ import annotations

import argparse

from dlm.config import folder_problem
from dlm.errors import UserError, user_errors
from dlm.parallel.export import consolidate_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dlm.consolidate", description=consolidate_run.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--ckpt", default="last", help="last | best | a checkpoint file or DeepSpeed folder")
    parser.add_argument("--out", default=None, help="output folder (default <run_dir>/hf)")
    parser.add_argument("--raw", action="store_true", help="a callbacks=ema run: export the raw weights, not the EMA")
    args = parser.parse_args(argv)
    with user_errors():
        if args.out is not None:

            problem = folder_problem("--out", args.out)
            if problem:
                raise UserError(problem)
        print(f"hf: {consolidate_run(args.run_dir, args.ckpt, args.out, use_ema=not args.raw)}")


if __name__ == "__main__":
    main()
