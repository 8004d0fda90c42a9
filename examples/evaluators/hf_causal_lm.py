"""Moved: use `python -m sewa.evaluators.hf` (docs/evaluator.md). This shim maps the old
`hf_causal_lm.py MODEL_DIR HELDOUT [flags]` to `--config-dir MODEL_DIR --tokenizer MODEL_DIR
--text HELDOUT [flags]`."""
import os, sys  # noqa: E401
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../clients/python"))
from sewa.evaluators.hf import main  # noqa: E402
if len(sys.argv) < 3:
    sys.exit(__doc__)
main(["--config-dir", sys.argv[1], "--tokenizer", sys.argv[1], "--text"] + sys.argv[2:])
