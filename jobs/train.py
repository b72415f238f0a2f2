"""Entry point for ``ray job submit``: same as ``vlp train``.

    ray job submit --working-dir . -- python jobs/train.py --config configs/valley7b/train_stage1.yaml
"""

import sys

import _checkout  # noqa: F401  (puts this checkout's platform/ first on sys.path)
from vlp.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
