"""Documented command sequences, run as written: the ``vlp`` lines of a doc's bash block, and one driver process
that runs them in order in a folder of the test's (tests/test_readme_local.py, test_mplug_owl_local.py,
test_lego_local.py)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time

from conftest import ROOT

DRIVER = """
import json, sys, time
from vlp.cli import main
for argv in json.loads(sys.argv[1]):
    t = time.time()
    rc = main(argv)
    print(f"[readme] vlp {' '.join(argv)}: exit {rc} in {time.time() - t:.1f} s", flush=True)
    if rc:
        sys.exit(rc)
"""


def vlp_commands(text: str) -> list[list[str]]:
    """The ``vlp`` lines of the first ```bash block in ``text``, up to a ``# and`` line: argv after ``vlp``, with
    comments and ``[optional]`` parts dropped."""
    block = text[text.index("```bash\n") + 8:]
    block = block[:block.index("```")]
    cmds = []
    for line in block.splitlines():
        if line.strip() == "# and":
            break
        line = re.sub(r"\s#.*$", "", line)  # a comment (a '#' inside a quoted glob stays)
        if line.startswith("vlp "):
            cmds.append(shlex.split(re.sub(r"(?<!=)\[[^\]]*\]", "", line))[1:])  # not a list value (k=[...])
    return cmds


def run_sequence(cmds: list[list[str]], cwd, timeout: int = 1200, env: dict | None = None
                 ) -> subprocess.CompletedProcess:
    """``vlp`` commands (config paths relative to the repository) in one driver process whose working directory
    is ``cwd`` (``env``: more environment variables); prints each command's exit and time."""
    cmds = [[c[0], *[str(ROOT / a) if a.startswith("configs/") else a for a in c[1:]]] for c in cmds]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform"), **(env or {})}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cmds)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    print(f"\n[test] sequence: {time.time() - t0:.0f} s")
    print("\n".join(ln for ln in p.stdout.splitlines() if ln.startswith("[readme]")))
    return p
