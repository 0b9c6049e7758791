"""The strategy seam: where a run executes (DeepSpeed ZeRO, FSDP, DDP, one device) and what that does to its
parameters and checkpoints. Models, families, optimisers and FLOP counting know nothing of sharding; the one
module of this package they may import is :mod:`dlm.parallel.params` (a parameter's true size and shape, gathered
views), as torchtitan keeps ``parallelize.py`` apart from ``model.py``. Nothing outside this package imports
``deepspeed`` or reads a parameter's ``ds_*`` attributes."""
