"""TEST-ONLY: dlm's DeepSpeedStrategy (dlm/parallel/deepspeed.py) on the CPU, so the ZeRO paths of the training CLI run in CPU tests.

Why this exists: Lightning refuses every non-CUDA accelerator in ``DeepSpeedStrategy.setup_environment``, but
DeepSpeed itself runs ZeRO (stages 1-3, CPU offload) on the CPU with its CPU accelerator (``DS_ACCELERATOR=cpu``)
and a gloo process group. What differs from the GPU path, and all that this class changes:

* the CUDA check is skipped (DDPStrategy's part of the setup, process group included, still runs);
* the devices are ``cpu:<local rank>`` instead of index-less ``cpu``: Lightning checks that device indices match
  the local ranks and passes ``device_rank=root_device.index`` to ``deepspeed.initialize``, which fails on None
  (``None >= 0``); an indexed CPU device is the same device to torch;
* the process group backend is gloo;
* ``stage3_param_persistence_threshold`` defaults to 0 instead of DeepSpeed's 1e5 elements: ZeRO-3 keeps
  parameters below the threshold whole on every rank, which would be every parameter of a tiny test model, so
  nothing would really be partitioned.

Selected from the CLI (tests put this folder on PYTHONPATH):
    trainer=deepspeed trainer.strategy._target_=zero_cpu_strategy.CPUDeepSpeedStrategy trainer.accelerator=cpu
Not part of dlm: production runs keep dlm's strategy on CUDA.
"""

from __future__ import annotations

import os

# DeepSpeed picks its accelerator once, at import: the CPU one, before anything imports deepspeed.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from dlm.parallel.deepspeed import DeepSpeedStrategy  # noqa: E402


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def __init__(self, *args, param_persistence_threshold: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        zero = (self.config or {}).get("zero_optimization")
        if zero is not None and zero.get("stage") == 3:
            zero["stage3_param_persistence_threshold"] = param_persistence_threshold

    def setup_environment(self) -> None:
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices or [None]))]
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's without its CUDA check

    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or "gloo"
