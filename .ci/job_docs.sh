#!/usr/bin/env bash
# Job "docs": the Sphinx site builds from a clean install of the `docs` extra,
# with warnings as errors. That covers broken docstring markup, a public symbol
# missing from docs/api/ (docs/_ext/api_coverage.py), a telemetry key without a
# description (docs/_ext/telemetry_table.py) and a tutorial cell that raises
# (myst-nb executes them). The build needs no network.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=.ci/lib.sh
. .ci/lib.sh
CI_JOB_NAME="${CI_JOB_NAME:-docs}"

ci_work_dir || exit 1
# Output outside the repository, so a CI run leaves no untracked files.
HTML="$CI_WORK/docs-html"

install_docs() {
  ci_fresh_venv python3 "$CI_WORK/venv-docs" || return 1
  pip install --quiet -e ".[docs]"
}

build_docs() {
  rm -rf "$HTML"
  # -E: read every page afresh; -W --keep-going: report every warning, then fail.
  python -m sphinx -E -W --keep-going -b html docs "$HTML"
}

ci_phase install install_docs || exit 1
ci_phase build build_docs
