"""The evaluator client: serve a loss (and its gradient) to sewa. See `sewa_evaluator`, whose
API this is (`from sewa.evaluator import serve`)."""

from sewa_evaluator import *  # noqa: F401,F403
from sewa_evaluator import __all__  # noqa: F401
