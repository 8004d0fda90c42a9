"""sewa: Selective Weight Averaging beside a training job.

`pip install` puts the `sewa` binary on PATH (the daemon and its commands: `sewa --help`) and
this package beside it. `sewa.evaluator` is the evaluator client (`serve`), the same as the
`sewa_evaluator` package existing scripts import.
"""

import os
import shutil
import sys

__all__ = ["binary"]


def binary() -> str:
    """The path of the `sewa` binary installed with this package (else the first on PATH)."""
    here = os.path.join(os.path.dirname(sys.executable), "sewa")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("sewa")
    if found is None:
        raise FileNotFoundError("no sewa binary next to this Python or on PATH")
    return found
