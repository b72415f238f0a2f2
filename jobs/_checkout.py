"""Imported first by every job script: run the vlp of the checkout the script sits in.

Under ``ray job submit --working-dir .`` that is the uploaded copy, not a vlp installed on the cluster;
vlp.runtime.init_ray ships the same package to the workers (runtime_env ``py_modules``).
"""

import sys
from pathlib import Path

_PLATFORM = Path(__file__).resolve().parents[1] / "platform"
if (_PLATFORM / "vlp" / "__init__.py").is_file():
    sys.path.insert(0, str(_PLATFORM))
