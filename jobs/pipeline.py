"""Entry point for ``ray job submit``: the whole pipeline, same as ``vlp demo``.

    python jobs/pipeline.py --config configs/local/demo.yaml [root=runs/demo2 ...]
"""

import sys

from vlp.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
