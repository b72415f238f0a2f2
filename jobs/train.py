"""Entry point for ``ray job submit``: same as ``vlp train``.

    ray job submit --working-dir . -- python jobs/train.py --config configs/valley7b/train_stage1.yaml
"""

import sys

from vlp.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
