"""Entry point for ``ray job submit``: same as ``vlp precompute``.

    ray job submit --working-dir . -- python jobs/precompute.py --config configs/webvid_s3/precompute.yaml
"""

import sys

from vlp.cli import main

if __name__ == "__main__":
    sys.exit(main(["precompute", *sys.argv[1:]]))
