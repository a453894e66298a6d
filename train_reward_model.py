"""Train a reward model: ``torchrun --nproc_per_node N train_reward_model.py --model llama --strategy ddp ...``.

See ``python train_reward_model.py --help`` and the README.
"""

import sys

from coati.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
