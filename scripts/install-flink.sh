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
# shellcheck source=cache-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cache-lib.sh"
DEST="$CACHE_ROOT/flink-$FLINK_VERSION"

ensure_java17
cache_begin "flink-$FLINK_VERSION" "$DEST"

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
