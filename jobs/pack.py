"""Entry point for ``ray job submit``: same as ``vlp pack``.

    ray job submit --working-dir . -- python jobs/pack.py --config configs/llava/pack_558k.yaml
"""

import sys

import _checkout  # noqa: F401  (puts this checkout's platform/ first on sys.path)
from vlp.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pack", *sys.argv[1:]]))
