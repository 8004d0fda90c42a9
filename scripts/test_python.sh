#!/usr/bin/env bash
# The Python side with the real libraries: a fresh venv gets torch, transformers and lightning
# (clients/python/tests/requirements.txt) and `pip install .` (the wheel: the `sewa` binary
# on the venv's PATH, the `sewa` package), then pytest runs clients/python/tests: the evaluator
# modules over the protocol, the HF Trainer and Lightning callbacks end to end on tiny models,
# on the CPU. Run by .ci/run; ~3 minutes of installing on a clean machine.
#
# The wheel is built with the dev profile so that it reuses the binary `cargo test` just built
# (a release build would add ~5 minutes on 2 cores); `pip install .` without
# MATURIN_PEP517_ARGS builds the release binary users get.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SEWA_TEST_VENV:-$(mktemp -d)/venv}"
[ -n "${SEWA_TEST_VENV:-}" ] || trap 'rm -rf "$(dirname "$venv")"' EXIT
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
"${pip[@]}" -r clients/python/tests/requirements.txt
MATURIN_PEP517_ARGS="${MATURIN_PEP517_ARGS:---profile dev}" "${pip[@]}" --no-deps --force-reinstall .
PATH="$venv/bin:$PATH"
[ "$(command -v sewa)" = "$venv/bin/sewa" ] || { echo "sewa is not the venv's: $(command -v sewa)"; exit 1; }
# The tests run against the installed package, not the checkout's sources.
cd clients/python/tests
"$venv/bin/python" -m pytest -q -p no:cacheprovider .
