"""Entry point for ``ray job submit``: the whole pipeline, same as ``vlp demo``.

    python jobs/pipeline.py --config configs/local/demo.yaml [root=runs/demo2 ...]
"""

import sys

import _checkout  # noqa: F401  (puts this checkout's platform/ first on sys.path)
from vlp.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
