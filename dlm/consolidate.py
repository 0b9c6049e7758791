"""`python -m dlm.consolidate <run_dir> [--ckpt last|best|PATH] [--out DIR]`: a run's checkpoint (DeepSpeed ZeRO
folder or Lightning file) as an HF-format folder that transformers and dlm load. See dlm.deepspeed_utils."""

from dlm.deepspeed_utils import main

if __name__ == "__main__":
    main()
