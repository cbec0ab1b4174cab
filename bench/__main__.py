"""Run a benchmark: `python -m bench <name> [options]`; `python -m bench` lists them.

Each benchmark is a module of this package with ``main(argv) -> int``; it is imported only when
asked for, so one benchmark's imports never slow or break another.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "trigger-latency": "bench.trigger_latency",  # [--alerts 50]
    "alert-storm": "bench.alert_storm",
    "restart-backlog": "bench.restart_backlog",  # [--alerts 50]
    "sqlite-races": "bench.sqlite_races",  # [--seconds 120] [--clients 8] [--server both]
    "wal-drain": "bench.wal_drain",
    "dlq-triage": "bench.dlq_triage",
    "topic-backup": "bench.topic_backup",  # [--records 100000] [--size 1024] [--repeats 3]
    "stuck-reset": "bench.stuck_reset",  # [--stuck 100000] [--rounds 1]
    "db-backup": "bench.db_backup",  # [--size-mb 1024] [--repeats 1] [--no-checksums]
    "archive-events": "bench.archive_events",  # [--rows 1000000] [--writers 2]
    "flink-restore": "bench.flink_restore",  # [--failures 10]
    "team": "bench.team",  # [--latency-alerts 20] [--alerts 100] [--workers 1,2,4]
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m bench {{{'|'.join(BENCHMARKS)}}} [options]")
        return 2
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
