# Shared helpers for the CI job scripts; sourced, never executed.
# shellcheck shell=bash

# Scratch space for the extra jobs' virtualenvs and build outputs. It lives
# outside the repository so that nothing a job creates can show up as an
# untracked file and be committed by accident. .ci/run exports one for all
# jobs; a job started by hand gets its own, removed when it exits.
# Sets CI_WORK; call it directly, not in $(...), or the EXIT trap would fire
# as soon as the command substitution's subshell ends.
ci_work_dir() {
  if [ -z "${CI_WORK:-}" ]; then
    CI_WORK="$(mktemp -d "${TMPDIR:-/tmp}/optax-stable-ci.XXXXXX")" || return 1
    export CI_WORK
    if [ -z "${CI_KEEP_WORK:-}" ]; then
      # shellcheck disable=SC2064  # expand now: the path is fixed from here on
      trap "rm -rf '$CI_WORK'" EXIT
    fi
  fi
}

# Caches that outlive one run (the Python 3.13 build): outside the repo and
# outside CI_WORK, so repeated runs on one machine build it only once.
ci_cache_dir() {
  printf '%s\n' "${CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/optax-stable-ci}"
}

# ci_fresh_venv PYTHON DIR: a brand-new virtualenv (never reuse one: a
# leftover package would hide a missing dependency), activated, with an
# up-to-date pip because old pips mis-resolve some of the newest wheels.
ci_fresh_venv() {
  local python="$1" dir="$2"
  rm -rf "$dir"
  "$python" -m venv "$dir" || return 1
  # shellcheck disable=SC1091
  . "$dir/bin/activate" || return 1
  python -m pip install --quiet --upgrade pip
}

# ci_pytest ARGS...: pytest, except that exit status 5 ("no tests collected")
# counts as a failure: a suite that silently collects nothing must not pass.
ci_pytest() {
  python -m pytest "$@"
  local rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "CI: pytest collected no tests; that is a broken suite, not a pass." >&2
    return 1
  fi
  return "$rc"
}

# ci_phase NAME COMMAND...: run one step and log how long it took, so that a
# slow CI run can be attributed to build, install or tests from the log alone.
ci_phase() {
  local name="$1" start rc
  shift
  start=$SECONDS
  "$@"
  rc=$?
  echo "CI phase ${CI_JOB_NAME:-?}/$name: rc=$rc, $((SECONDS - start)) s" >&2
  return "$rc"
}
