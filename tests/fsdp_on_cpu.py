"""`accelerate launch` target for the FSDP test. accelerate turns FSDP on only for accelerator devices, while FSDP2
itself runs on CPU over gloo, so this lifts accelerate's device gate before the trainer builds its Accelerator (through
a private field, as of accelerate 1.15: the FSDP test fails loudly if that changes)."""

import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

from refface_core.cli import main

PartialState(cpu=True)
PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # read by AcceleratorState to pick FSDP
sys.exit(main(["train", *sys.argv[1:]]))
