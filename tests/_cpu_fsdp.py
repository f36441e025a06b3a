"""Test shim: run a script under torchrun with accelerate's FSDP2 plugin on CPU (gloo).

    torchrun --nproc_per_node 2 tests/_cpu_fsdp.py SCRIPT [ARGS...]

Why a shim: accelerate 1.15 selects its FSDP plugin only for accelerator device types (``AcceleratorState.__init__``
switches to ``DistributedType.FSDP`` inside the MULTI_GPU / MULTI_XPU / ... branch); on CPU the run is MULTI_CPU and
``accelerate launch --use_fsdp`` silently trains data parallel instead. PyTorch's FSDP2 (``fully_shard``) itself runs on
CPU with gloo. So this shim, and nothing else, changes two things: the process group is made here (gloo), and
``PartialState`` reports an accelerator-type distributed run on the CPU device, so that accelerate's own FSDP2 path
(``fsdp2_prepare_model``: ``fully_shard`` per decoder layer, DTensor parameters, full state dict gathered for saving)
and transformers' Trainer FSDP path run unmodified. The FSDP settings are the ones ``accelerate launch`` derives from
``recipes/accelerate/fsdp2.yaml`` (except cpu_ram_efficient_loading, which broadcasts from rank 0 on the GPU).
"""

import os
import runpy
import sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType

_prepare_backend = PartialState._prepare_backend


def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    backend, kind = _prepare_backend(self, cpu=True, sagemaker_dp=sagemaker_dp, backend=backend)
    return backend, (DistributedType.MULTI_GPU if kind == DistributedType.MULTI_CPU else kind)


def set_device(self):
    if self.device is None:
        self.device = torch.device("cpu")


if __name__ == "__main__":
    PartialState._prepare_backend = prepare_backend
    PartialState.set_device = set_device
    torch.distributed.init_process_group("gloo")
    os.environ.update(
        ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
        FSDP_RESHARD_AFTER_FORWARD="true", FSDP_STATE_DICT_TYPE="FULL_STATE_DICT", FSDP_OFFLOAD_PARAMS="false",
        FSDP_CPU_RAM_EFFICIENT_LOADING="false", FSDP_ACTIVATION_CHECKPOINTING="false",
    )  # fmt: skip
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
