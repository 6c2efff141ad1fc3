#!/usr/bin/env bash
# Job "main": a fresh virtualenv, then exactly the README's test command.
# Its venv stays at .ci-venv (git-ignored) as before, so it can be inspected
# after a failure.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=.ci/lib.sh
. .ci/lib.sh

ci_fresh_venv python3 .ci-venv || exit 1
pip install -e ".[test,parity]" || exit 1
# Extra arguments go to pytest (e.g. .ci/job_main.sh -x -k clip).
ci_pytest "$@"
