"""`vlpet-fx train` under Accelerate's FSDP2 on a CPU-only machine, for the tests (run by torchrun).

Accelerate (1.15) sets FSDP up only on GPUs and other accelerators: on CPU it gives DDP (MULTI_CPU), although
torch's FSDP2 (``fully_shard``) runs on gloo. This driver changes that one decision after Accelerate has set up
its CPU process group — distributed type FSDP with an FSDP2 plugin — and then runs the real command line, so
the training loop's FSDP code (Accelerate's fully_shard preparation, the wrapping policy, gathered checkpoints,
resume into shards, evaluation and saving with whole parameters) runs as on a GPU box.
"""

import sys

import accelerate
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = accelerate.Accelerator.__init__


def _init_with_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.state.distributed_type is DistributedType.MULTI_CPU:
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=False,
                                                                reshard_after_forward=True)


accelerate.Accelerator.__init__ = _init_with_fsdp

if __name__ == "__main__":
    from vlpet_fx.cli.main import main

    sys.argv = ["vlpet-fx", *sys.argv[1:]]
    main()
