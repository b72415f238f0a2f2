"""Entry point for ``ray job submit``: same as ``vlp precompute``.

    ray job submit --working-dir . -- python jobs/precompute.py --config configs/webvid_s3/precompute.yaml
"""

import sys

import _checkout  # noqa: F401  (puts this checkout's platform/ first on sys.path)
from vlp.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["precompute", *sys.argv[1:]]))
