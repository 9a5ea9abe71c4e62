"""`accelerate launch -m refface_core.training --config FILE.yaml [--resume]`: training on several GPUs or nodes."""

import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
