#!/usr/bin/env bash
# Job "minimum": the suite against the lowest versions pyproject.toml allows, so
# that a floor we declare but no longer work on is caught (pyproject's `>=`
# floors are otherwise never installed by anyone).
#
# The pins are derived from pyproject.toml: every `>=X` (or `==X`) of the core
# dependencies and of the `test` extra becomes `==X`. One environment cannot
# hold them all: Flax 0.12 (and Orbax 0.12) need a newer JAX than our core
# floor. So the job runs in two phases in one fresh venv:
#   1. core floors (jax, optax) + test floors, without the packages in
#      NEED_NEWER_JAX: the whole suite; their tests skip (importorskip).
#   2. those packages added at their floors, with JAX raised to the lowest
#      version they accept (read from their own metadata): the test files that
#      use them.
# Extra arguments go to pytest in both phases.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
CI_JOB_NAME="${CI_JOB_NAME:-minimum}"
if [ -f .ci/lib.sh ]; then
  # shellcheck source=.ci/lib.sh
  . .ci/lib.sh
else  # standalone fallbacks for the helpers of .ci/lib.sh this job uses
  ci_fresh_venv() {
    rm -rf "$2" && "$1" -m venv "$2" && . "$2/bin/activate" &&
      python -m pip install --quiet --upgrade pip
  }
  ci_pytest() {
    python -m pytest "$@"
    local rc=$?
    [ "$rc" -eq 5 ] && { echo "CI: pytest collected no tests." >&2; return 1; }
    return "$rc"
  }
  ci_phase() { local n="$1" s=$SECONDS rc; shift; "$@"; rc=$?
    echo "CI phase $CI_JOB_NAME/$n: rc=$rc, $((SECONDS - s)) s" >&2; return "$rc"; }
fi

VENV=.ci-venv-min  # git-ignored; kept after the job for inspection
# Test dependencies whose floors need a newer JAX than the core floor.
NEED_NEWER_JAX=(flax orbax-checkpoint)

# pins core|test: one `name==floor` per line, from pyproject.toml.
pins() {
  python3 - "$1" <<'EOF'
import re, sys, tomllib
with open("pyproject.toml", "rb") as f:
  project = tomllib.load(f)["project"]
reqs = project["dependencies"] if sys.argv[1] == "core" else \
    project["optional-dependencies"][sys.argv[1]]
out = []
for req in reqs:
  match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[[^]]*\])?\s*(.*)", req.split(";")[0])
  name, spec = match.groups()
  floor = re.search(r"(?:>=|==)\s*([^,\s]+)", spec)
  if not floor:
    sys.exit(f"CI: {req!r} in pyproject.toml has no floor (>= or ==) to test")
  out.append(f"{name}=={floor.group(1)}")
print("\n".join(out))
EOF
}

CORE=() TEST_NOW=() TEST_LATER=()
mapfile -t CORE < <(pins core) && [ "${#CORE[@]}" -gt 0 ] || exit 1
mapfile -t TEST < <(pins test) && [ "${#TEST[@]}" -gt 0 ] || exit 1
for pin in "${TEST[@]}"; do
  later=
  for name in "${NEED_NEWER_JAX[@]}"; do [ "${pin%%==*}" = "$name" ] && later=1; done
  if [ -n "$later" ]; then TEST_LATER+=("$pin"); else TEST_NOW+=("$pin"); fi
done

show_versions() {
  python - jax jaxlib optax numpy "${NEED_NEWER_JAX[@]}" "${TEST_NOW[@]%%==*}" <<'EOF'
import importlib.metadata as md, platform, sys
print(f"CI: Python {platform.python_version()}")
for name in sys.argv[1:]:
  try:
    print(f"CI:   {name} {md.version(name)}")
  except md.PackageNotFoundError:
    print(f"CI:   {name} (not installed)")
EOF
}

install_floors() {
  echo "CI: phase 1 pins: ${CORE[*]} ${TEST_NOW[*]}" >&2
  pip install "${CORE[@]}" "${TEST_NOW[@]}" || return 1
  pip install --no-deps -e . || return 1
  show_versions
}

# The lowest JAX that every pinned package of phase 2 accepts (their own
# `jax>=` requirements), and never below our core floor.
install_later() {
  pip install --no-deps "${TEST_LATER[@]}" || return 1
  local jax_pin
  jax_pin="$(python - "${CORE[@]}" "${TEST_LATER[@]}" <<'EOF'
import importlib.metadata as md, re, sys
def key(version):
  return tuple(int(part) for part in re.findall(r"\d+", version))
floors = [pin.split("==")[1] for pin in sys.argv[1:] if pin.split("==")[0] == "jax"]
for pin in sys.argv[1:]:
  name = pin.split("==")[0]
  if name == "jax":
    continue
  for req in md.requires(name) or []:
    if "extra ==" in req:
      continue
    match = re.fullmatch(r"jax\s*\(?\s*([^;)]*)\)?\s*(;.*)?", req.strip())
    if match:
      floors += re.findall(r">=\s*([0-9][^,\s]*)", match.group(1))
print(max(floors, key=key))
EOF
)" || return 1
  local others=() pin
  for pin in "${CORE[@]}"; do [ "${pin%%==*}" = jax ] || others+=("$pin"); done
  echo "CI: phase 2 pins: jax==$jax_pin jaxlib==$jax_pin ${TEST_LATER[*]}" >&2
  pip install "jax==$jax_pin" "jaxlib==$jax_pin" "${others[@]}" "${TEST_LATER[@]}" \
    "${TEST_NOW[@]}" || return 1
  show_versions
}

ci_fresh_venv python3 "$VENV" || exit 1
ci_phase install-core install_floors || exit 1
ci_phase pytest-core ci_pytest "$@"
rc_core=$?

rc_later=0
if [ "${#TEST_LATER[@]}" -gt 0 ]; then
  # The test files that use the phase-2 packages.
  pattern="$(printf '%s\n' "${TEST_LATER[@]%%==*}" | sed 's/-checkpoint$//' | paste -sd '|')"
  mapfile -t files < <(grep -lE "$pattern" tests/test_*.py)
  if ci_phase install-later install_later; then
    ci_phase pytest-later ci_pytest "${files[@]}" "$@"
    rc_later=$?
  else
    rc_later=1
  fi
fi
echo "CI: minimum job: core floors rc=$rc_core, ${TEST_LATER[*]} floors rc=$rc_later" >&2
# pytest's own code (ci_pytest already turned 5, no tests, into 1); the first failure wins.
[ "$rc_core" -ne 0 ] && exit "$rc_core"
exit "$rc_later"
