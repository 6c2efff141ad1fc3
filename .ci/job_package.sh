#!/usr/bin/env bash
# Job "package": what users install is the wheel, not the source tree the
# other jobs test (editable installs hide files missing from the package).
# Build sdist and wheel, let twine validate their metadata, then install the
# wheel into a clean venv and import it from outside the repository.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=.ci/lib.sh
. .ci/lib.sh
CI_JOB_NAME="${CI_JOB_NAME:-package}"

ci_work_dir || exit 1
DIST="$CI_WORK/dist"
rm -rf "$DIST"

build_dists() {
  # The build tools get their own venv so that they cannot satisfy (and thus
  # hide) a dependency the wheel fails to declare.
  ci_fresh_venv python3 "$CI_WORK/venv-package-tools" || return 1
  pip install --quiet build twine || return 1
  # Default mode: sdist first, then the wheel built from the unpacked sdist,
  # so a file missing from the sdist also goes missing from the wheel.
  python -m build --outdir "$DIST" . || return 1
  twine check --strict "$DIST"/* || return 1
  deactivate
}

install_and_check() {
  local wheels=("$DIST"/*.whl)
  [ "${#wheels[@]}" -eq 1 ] && [ -f "${wheels[0]}" ] ||
    { echo "CI: expected exactly one wheel in $DIST" >&2; return 1; }
  ci_fresh_venv python3 "$CI_WORK/venv-package-install" || return 1
  pip install "${wheels[0]}" || return 1
  # Run from the scratch dir: from the repo root, `import optax_stable` would
  # find the source tree on sys.path and prove nothing about the wheel.
  (cd "$CI_WORK" && python - <<'EOF'
import importlib.metadata
import importlib.resources
import pathlib
import sys

import optax_stable

print(optax_stable.__version__)
location = pathlib.Path(optax_stable.__file__).resolve()
if pathlib.Path(sys.prefix).resolve() not in location.parents:
  sys.exit(f"CI: imported optax_stable from {location}, not from the venv")
if not importlib.resources.files("optax_stable").joinpath("py.typed").is_file():
  sys.exit("CI: py.typed is missing from the installed package (PEP 561)")
dist_version = importlib.metadata.version("optax-stable")
if dist_version != optax_stable.__version__:
  sys.exit(f"CI: optax_stable.__version__ is {optax_stable.__version__} "
           f"but the installed distribution is {dist_version}")
EOF
  )
}

ci_phase build build_dists || exit 1
ci_phase install-check install_and_check
