#!/usr/bin/env bash
# `pip install <checkout>` in a fresh venv: the `sewa` binary lands on the venv's PATH and
# `import sewa`, `sewa.evaluator` and `sewa_evaluator` work. Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
MATURIN_PEP517_ARGS="${MATURIN_PEP517_ARGS:---profile dev}" "$venv/bin/pip" install --quiet --disable-pip-version-check .
PATH="$venv/bin:$PATH"
[ "$(command -v sewa)" = "$venv/bin/sewa" ] || { echo "sewa is not the venv's: $(command -v sewa)"; exit 1; }
sewa --version
"$venv/bin/python" - <<'PY'
import os, subprocess, sys
import sewa, sewa.evaluator, sewa_evaluator
assert sewa.evaluator.serve is sewa_evaluator.serve, "sewa.evaluator is not the client"
binary = sewa.binary()
assert os.path.dirname(binary) == os.path.dirname(sys.executable), binary
out = subprocess.run([binary, "example-config"], capture_output=True, text=True, check=True)
assert "[watch]" in out.stdout
print("wheel ok:", binary)
PY
