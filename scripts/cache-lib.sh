# Sourced by the install-*.sh scripts: large downloads cached once under
# ${RUNBOOKS_CACHE:-$HOME/.cache/runbooks}, atomically, and the Java 17 they run on.
#
# cache_begin NAME DEST exits the calling script at once when DEST is complete (its `.complete`
# marker is written last, before the rename into place); otherwise it takes NAME's lock (several
# test sessions may start together), looks again, removes what killed runs left and makes $TMP, a
# directory next to the cache that is removed on exit. The caller builds in $TMP and renames its
# result to DEST: a killed download never counts as done.

CACHE_ROOT="${RUNBOOKS_CACHE:-$HOME/.cache/runbooks}"
JAVA_HOME_17="/usr/lib/jvm/java-17-openjdk-amd64"
SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$SCRIPTS/../.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"

# Java 17 (a JDK: the tests compile their Flink job with javac), installed with apt when root
ensure_java17() {
  [ -x "$JAVA_HOME_17/bin/javac" ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Java 17 JDK; install it with: sudo apt-get install -y openjdk-17-jdk-headless" >&2
    exit 1
  fi
  echo "installing system packages: openjdk-17-jdk-headless"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends openjdk-17-jdk-headless </dev/null
}

cache_begin() {
  local name="$1" dest="$2"
  if [ -f "$dest/.complete" ]; then
    exit 0
  fi
  mkdir -p "$CACHE_ROOT"
  exec 9>"$CACHE_ROOT/.$name.lock"
  flock 9
  if [ -f "$dest/.complete" ]; then
    exit 0
  fi
  rm -rf "$CACHE_ROOT/.$name.tmp."*
  TMP="$(mktemp -d "$CACHE_ROOT/.$name.tmp.XXXXXX")"
  trap 'rm -rf "$TMP"' EXIT
}
