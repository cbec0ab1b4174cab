#!/usr/bin/env bash
# Download and cache an Apache Flink 2.3 distribution for the tests' session cluster, and make sure
# Java 17 is there to run it. Idempotent: a quick no-op once the cache is complete.
#
# No Flink tarball is reachable here, but PyPI ships the distribution inside two wheels:
# apache-flink-libraries (lib/, opt/, plugins/: ~330 MB) and apache-flink (bin/ and conf/).
# Both are fetched with `pip download --no-deps` and unpacked into a temporary directory next to
# the cache, then renamed into place: a killed download leaves only a temporary directory (removed
# on the next run), never a half-filled cache that looks finished.
set -euo pipefail

FLINK_VERSION="${FLINK_VERSION:-2.3.0}"
CACHE_ROOT="${RUNBOOKS_CACHE:-$HOME/.cache/runbooks}"
DEST="$CACHE_ROOT/flink-$FLINK_VERSION"
JAVA_HOME_17="/usr/lib/jvm/java-17-openjdk-amd64"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$HERE/../.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"

# --- Java 17 (a JDK: the tests compile their Flink job with javac) ---------------------------------
if [ ! -x "$JAVA_HOME_17/bin/javac" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Java 17 JDK; install it with: sudo apt-get install -y openjdk-17-jdk-headless" >&2
    exit 1
  fi
  echo "installing system packages: openjdk-17-jdk-headless"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends openjdk-17-jdk-headless </dev/null
fi

# --- Flink distribution -------------------------------------------------------------------------
# the marker is written last, inside the temporary directory, before the rename
if [ -f "$DEST/.complete" ]; then
  exit 0
fi
mkdir -p "$CACHE_ROOT"
# one download at a time (several test sessions may start together); then look again
exec 9>"$CACHE_ROOT/.flink-$FLINK_VERSION.lock"
flock 9
if [ -f "$DEST/.complete" ]; then
  exit 0
fi
# leftovers of killed runs
rm -rf "$CACHE_ROOT"/.flink-"$FLINK_VERSION".tmp.*
TMP="$(mktemp -d "$CACHE_ROOT/.flink-$FLINK_VERSION.tmp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

echo "downloading Apache Flink $FLINK_VERSION (apache-flink-libraries, apache-flink wheels, ~330 MB)"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$TMP/wheels" \
  "apache-flink-libraries==$FLINK_VERSION" "apache-flink==$FLINK_VERSION"

"$PYTHON" - "$TMP/wheels" "$TMP/dist" <<'EOF'
import pathlib
import sys
import zipfile

wheels, dist = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dist.mkdir()


def extract(wheel: pathlib.Path, prefixes: tuple[str, ...]) -> int:
    count = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            if info.is_dir() or not name.startswith(prefixes):
                continue
            target = dist / name.removeprefix("pyflink/")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            count += 1
    return count


[libraries] = wheels.glob("apache_flink_libraries-*")
[flink] = [w for w in wheels.glob("apache_flink-*") if "libraries" not in w.name]
extract(libraries, ("pyflink/",))
extract(flink, ("pyflink/bin/", "pyflink/conf/"))
if not list((dist / "lib").glob("flink-dist-*.jar")) or not (dist / "bin" / "jobmanager.sh").exists():
    sys.exit(f"unexpected wheel layout: {sorted(p.name for p in dist.iterdir())}")
EOF

chmod +x "$TMP"/dist/bin/*
echo "$FLINK_VERSION" >"$TMP/dist/.complete"
rm -rf "$DEST"  # an incomplete one (no marker) from an older layout
mv "$TMP/dist" "$DEST"
echo "Flink $FLINK_VERSION cached in $DEST"
