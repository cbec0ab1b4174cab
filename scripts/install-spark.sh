#!/usr/bin/env bash
# Download Apache Spark (the PyPI `pyspark` sdist, which carries Spark's jars and launch scripts) ONCE
# into ${RUNBOOKS_CACHE:-$HOME/.cache/runbooks}/spark-<version> for the Spark runbook's tests: a
# standalone master and worker (bin/spark-class) and Python drivers (PYTHONPATH = python/ + py4j zip).
# Idempotent: a quick no-op when the cache is complete. Atomic: everything is unpacked into a temp
# directory that is renamed into place last, so a killed download never counts as done.
# pyspark is NOT a project dependency (the venv stays small). Java 17 comes from Debian.
set -euo pipefail

SPARK_VERSION="${SPARK_VERSION:-4.3.0}"
# shellcheck source=cache-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cache-lib.sh"
DEST="$CACHE_ROOT/spark-$SPARK_VERSION"

ensure_java17
cache_begin "spark-$SPARK_VERSION" "$DEST"

echo "downloading pyspark $SPARK_VERSION (about 450 MB, once) into $DEST"
"$PYTHON" -m pip download --quiet --no-deps --no-binary pyspark --dest "$TMP/dl" "pyspark==$SPARK_VERSION"
tar -xzf "$TMP/dl/pyspark-$SPARK_VERSION.tar.gz" -C "$TMP"
SRC="$TMP/pyspark-$SPARK_VERSION"
HOME_DIR="$TMP/home"
mkdir -p "$HOME_DIR/python"
# The sdist lays Spark out as deps/{bin,sbin,jars,...} and the Python package as pyspark/.
for d in bin sbin jars data licenses; do
  if [ -d "$SRC/deps/$d" ]; then
    mv "$SRC/deps/$d" "$HOME_DIR/$d"
  fi
done
mv "$SRC/pyspark" "$HOME_DIR/python/pyspark"
mkdir -p "$HOME_DIR/python/lib"
PY4J="$(ls "$SRC"/lib/py4j-*-src.zip 2>/dev/null || true)"
if [ -z "$PY4J" ]; then
  PY4J_VERSION="$(sed -n 's/.*py4j==\([0-9.]*\).*/\1/p' "$SRC/setup.py" | head -1)"
  "$PYTHON" -m pip download --quiet --no-deps --no-binary py4j --dest "$TMP/dl" "py4j==$PY4J_VERSION"
  tar -xzf "$TMP"/dl/py4j-*.tar.gz -C "$TMP"
  (cd "$TMP"/py4j-*/src && "$PYTHON" -m zipfile -c "$HOME_DIR/python/lib/py4j-src.zip" py4j)
else
  cp "$PY4J" "$HOME_DIR/python/lib/"
fi
echo "$SPARK_VERSION" >"$HOME_DIR/RELEASE"
chmod +x "$HOME_DIR"/bin/* "$HOME_DIR"/sbin/* 2>/dev/null || true
test -x "$HOME_DIR/bin/spark-class" || { echo "no bin/spark-class in the pyspark sdist" >&2; exit 1; }
ls "$HOME_DIR"/jars/spark-core_*.jar >/dev/null
touch "$HOME_DIR/.complete"
rm -rf "$DEST"
mv "$HOME_DIR" "$DEST"
echo "Spark $SPARK_VERSION ready in $DEST"
