#!/usr/bin/env bash
# Job "newest": the suite against the newest JAX, jaxlib, Optax, Flax and Orbax
# on Python 3.13, so that an upstream release that breaks us is seen
# before users report it (pyproject has no upper bounds on these).
#
# The CI machines run Debian 12, which packages no Python >= 3.12, and may only
# reach package registries. So the interpreter is built from Debian 13
# (trixie)'s python3.13 source package, fetched with apt from the mirror this
# machine is already configured to use, and cached outside the repository.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=.ci/lib.sh
. .ci/lib.sh
CI_JOB_NAME="${CI_JOB_NAME:-newest}"

ci_work_dir || exit 1
WORK="$CI_WORK"
CACHE="$(ci_cache_dir)"
PREFIX="$CACHE/python3.13"
PY="$PREFIX/bin/python3.13"
# The modules the test dependencies need at import time; a build that
# silently skipped one of them (missing -dev package) is useless.
PY_CHECK='import ssl, sqlite3, zlib, lzma, bz2, ctypes'

# The packages this job upgrades to their newest release.
NEWEST=(jax jaxlib optax flax orbax-checkpoint)

# Debian 12 build dependencies for those modules (ctypes needs libffi-dev
# since 3.13 no longer bundles libffi). readline, gdbm, tk: not needed.
BUILD_DEPS=(build-essential pkg-config xz-utils libssl-dev zlib1g-dev
  libffi-dev liblzma-dev libbz2-dev libsqlite3-dev)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo -n "$@"
  else
    echo "CI: need root for: $*" >&2
    return 1
  fi
}

# Install only what is missing: apt-get install is slow and needs root even
# when it has nothing to do.
ensure_build_deps() {
  local missing=() pkg
  if ! command -v dpkg-query >/dev/null; then
    echo "CI: no dpkg-query; assuming build dependencies are present." >&2
    return 0
  fi
  for pkg in "${BUILD_DEPS[@]}"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" != installed ]; then
      missing+=("$pkg")
    fi
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  echo "CI: installing missing build dependencies: ${missing[*]}" >&2
  # The machine's own (bookworm) sources: these are ordinary system packages.
  as_root apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# Print the first URI of the machine's main Debian archive (the entry for its
# own codename, i.e. not -security/-updates), read from its apt sources in
# either format. Nothing is hard-coded: if the machine uses a mirror or a
# proxy-style URI, trixie is fetched through the same one.
debian_archive_uri() {
  local codename sourcelist sourceparts
  codename="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
  [ -n "$codename" ] || { echo "CI: no VERSION_CODENAME in /etc/os-release" >&2; return 1; }
  # Where apt itself reads its sources from (normally /etc/apt/...).
  eval "$(apt-config shell sourcelist Dir::Etc::SourceList/f sourceparts Dir::Etc::SourceParts/d)"
  {
    # One-line format: deb [options] URI suite component...
    for f in "$sourcelist" "$sourceparts"/*.list; do
      [ -f "$f" ] || continue
      awk -v codename="$codename" '
        $1 == "deb" {
          i = 2
          if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
          if ($(i + 1) == codename) print $i
        }' "$f"
    done
    # deb822 format: stanzas of "Key: value" lines separated by blank lines.
    for f in "$sourceparts"/*.sources; do
      [ -f "$f" ] || continue
      awk -v codename="$codename" '
        function flush() {
          if ((" " types " ") ~ / deb / && enabled != "no" &&
              (" " suites " ") ~ (" " codename " ")) {
            split(uris, u, " "); print u[1]
          }
          types = uris = suites = enabled = ""
        }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        /^[^ \t][^:]*:/ {
          key = tolower(substr($0, 1, index($0, ":") - 1))
          val = substr($0, index($0, ":") + 1)
          gsub(/^[ \t]+|[ \t]+$/, "", val)
          if (key == "types") types = val
          else if (key == "uris") uris = val
          else if (key == "suites") suites = val
          else if (key == "enabled") enabled = tolower(val)
        }
        END { flush() }' "$f"
    done
  } | head -n 1 | grep .
}

# fetch_source DIR: download trixie's python3.13 source package into DIR.
# apt runs with a private sources dir and lists dir under $WORK, so the
# machine's apt configuration and package lists are left untouched: trixie
# never becomes an install source for this (bookworm) system.
fetch_source() {
  local dest="$1" apt_dir uri keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  uri="$(debian_archive_uri)" || { echo "CI: no Debian archive URI in apt sources" >&2; return 1; }
  # bookworm's debian-archive-keyring (2023.3+deb12u1 and later) already holds
  # trixie's keys, and trixie's Release file is also signed with bookworm's
  # archive key, so signatures are checked with the keyring we already trust
  # rather than with [trusted=yes] or a keyring downloaded over the same
  # channel it would be verifying.
  [ -f "$keyring" ] || { echo "CI: $keyring missing (package debian-archive-keyring)" >&2; return 1; }
  apt_dir="$WORK/apt"
  mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial" || return 1
  cat >"$apt_dir/sources.list.d/trixie-src.sources" <<EOF
Types: deb-src
URIs: $uri
Suites: trixie
Components: main
Signed-By: $keyring
EOF
  local apt_opts=(
    -o "Dir::Etc::SourceList=/dev/null"
    -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
    -o "Dir::State::Lists=$apt_dir/lists"
    # Don't let the trixie index leak into apt's shared binary caches.
    -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
  )
  # The unprivileged _apt user cannot enter our private (mode 700) temp dirs;
  # as root, download as root instead of apt's noisy fallback.
  [ "$(id -u)" -eq 0 ] && apt_opts+=(-o "APT::Sandbox::User=root")
  echo "CI: fetching python3.13 source from trixie at $uri" >&2
  # A bad or missing signature makes update fail (apt refuses unsigned
  # repositories), and source then verifies every file's hash against the
  # signed index.
  apt-get "${apt_opts[@]}" -q update || return 1
  (cd "$dest" && apt-get "${apt_opts[@]}" -q source --download-only python3.13)
}

build_python() {
  local src_dir="$WORK/python-src" stage tarball src log="$CACHE/python3.13-build.log"
  mkdir -p "$src_dir" "$CACHE" || return 1
  ensure_build_deps || return 1
  fetch_source "$src_dir" || return 1
  # The upstream tarball only: most of Debian's patches adapt CPython to
  # Debian's multiarch layout and packaging split, which a private --prefix
  # install does not want. (Its backported security fixes are lost too; this
  # interpreter only ever runs our own test suite.)
  local tarballs=("$src_dir"/python3.13_*.orig.tar.xz)
  tarball="${tarballs[0]}"
  [ -f "$tarball" ] || { echo "CI: no python3.13_*.orig.tar.xz downloaded" >&2; return 1; }
  tar -xJf "$tarball" -C "$src_dir" || return 1
  src="$(find "$src_dir" -mindepth 1 -maxdepth 1 -type d -name 'Python-3.13*' | head -n 1)"
  [ -n "$src" ] || { echo "CI: tarball has no Python-3.13* directory" >&2; return 1; }
  echo "CI: building $(basename "$src") into $PREFIX (log: $log)" >&2
  # Install into a staging dir next to the cache and rename it into place, so
  # an interrupted build never leaves a half-installed interpreter that later
  # runs would pick up. No --enable-optimizations: PGO triples the build time
  # for a speed-up the test suite (XLA-compile bound) would not notice.
  stage="$CACHE/python3.13.stage.$$"
  rm -rf "$stage"
  if ! (
    cd "$src" &&
      ./configure --prefix="$PREFIX" --disable-test-modules --with-ensurepip=install &&
      make -j"$(nproc)" &&
      make install DESTDIR="$stage"
  ) >"$log" 2>&1; then
    echo "CI: Python build failed; last lines of $log:" >&2
    tail -n 40 "$log" >&2
    rm -rf "$stage"
    return 1
  fi
  if ! "$stage$PREFIX/bin/python3.13" -c "$PY_CHECK"; then
    echo "CI: the Python build lacks a required module (missing -dev package?)." >&2
    grep -A3 'necessary bits\|Failed to build' "$log" >&2
    rm -rf "$stage"
    return 1
  fi
  rm -rf "$PREFIX" && mv "$stage$PREFIX" "$PREFIX" || return 1
  rm -rf "$stage"
  basename "$tarball" >"$PREFIX/SOURCE"
}

ensure_python() {
  if "$PY" -c "$PY_CHECK" 2>/dev/null; then
    echo "CI: using cached $("$PY" --version) at $PREFIX ($(cat "$PREFIX/SOURCE" 2>/dev/null))" >&2
    return 0
  fi
  mkdir -p "$CACHE" || return 1
  # Two CI runs on one machine must not build into the same prefix at once;
  # the second waits, then finds the first one's build.
  (
    flock 9 || exit 1
    "$PY" -c "$PY_CHECK" 2>/dev/null && exit 0
    build_python
  ) 9>"$CACHE/python3.13.lock"
}

install_newest() {
  pip install -e ".[test]" || return 1
  pip install --upgrade "${NEWEST[@]}" || return 1
  # The versions belong in the log: "newest" means nothing a week later.
  python - "${NEWEST[@]}" numpy <<'EOF'
import importlib.metadata as md, platform, sys
print(f"CI: Python {platform.python_version()}")
for name in sys.argv[1:]:
  print(f"CI:   {name} {md.version(name)}")
EOF
}

ci_phase python-build ensure_python || exit 1
ci_fresh_venv "$PY" "$WORK/venv-newest" || exit 1
ci_phase install install_newest || exit 1
# No parity extra: torch has no wheel for 3.13 here; those tests importorskip.
# Extra arguments go to pytest.
ci_phase pytest ci_pytest "$@"
