#!/usr/bin/env bash
# Install the Debian packages the test suite needs, only those missing, only when root.
# The tests start their own throwaway servers (initdb/pg_ctl, prometheus-alertmanager); promtool
# checks the example alerting rules; ZooKeeper (Debian's, Java) backs the ensemble checks of
# kafka-cluster-down. Nothing here starts a system service.
set -euo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v runuser >/dev/null 2>&1 || missing+=(util-linux)
command -v prometheus-alertmanager >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[ -f /usr/share/zookeeper/bin/zkServer.sh ] || missing+=(zookeeper)
# a Docker-compatible engine for the Docker backend's tests: podman with runc (crun lacks a
# capability here), and busybox-static as the root filesystem of the containers (no registry)
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
# data stores the runbooks operate: throwaway Redis and MariaDB servers per test session
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v mariadbd >/dev/null 2>&1 || missing+=(mariadb-server)
command -v mariadb-dump >/dev/null 2>&1 || missing+=(mariadb-client)

if [ ${#missing[@]} -ne 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing system packages: ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
fi

# Apache Flink 2.3 (from its PyPI wheels, cached once) and Java 17 for the Flink session cluster
bash "$(dirname "${BASH_SOURCE[0]}")/install-flink.sh"

# Apache Spark (PyPI pyspark, ~450 MB) and Java 17 for the Spark runbook's tests: downloaded once
# into the cache, a quick no-op afterwards
bash "$(dirname "${BASH_SOURCE[0]}")/install-spark.sh"
