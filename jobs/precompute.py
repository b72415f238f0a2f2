"""Entry point for ``ray job submit``: same as ``vlp precompute``.

    ray job submit --working-dir . -- python jobs/precompute.py --config configs/webvid_s3/precompute.yaml
"""

import sys
from pathlib import Path

# Run the vlp of the checkout this script sits in (under `ray job submit --working-dir .`: the uploaded copy),
# not a vlp installed on the cluster; vlp.runtime.init_ray ships the same package to the workers (py_modules).
_PLATFORM = Path(__file__).resolve().parents[1] / "platform"
if (_PLATFORM / "vlp" / "__init__.py").is_file():
    sys.path.insert(0, str(_PLATFORM))

from vlp.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["precompute", *sys.argv[1:]]))
