"""`python -m bench restart-backlog [--alerts 50]`: `runbooks up` restarted with alerts queued.

The scenario is tests/backlog.py (also run by tests/integration/test_restart_backlog.py): alerts
accepted by the gateway while Prefect was down, then `runbooks up` launched; the table shows how
long the API was silent, SQLite lock errors, and when the first and the last run finished.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.backlog import restart_with_backlog
from tests.servers import start_postgres


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench restart-backlog")
    parser.add_argument("--alerts", type=int, default=50)
    args = parser.parse_args(argv)
    postgres = start_postgres()
    home = Path(tempfile.mkdtemp(prefix="bench-backlog-"))
    print(f"logs in {home}")
    try:
        result = restart_with_backlog(home, postgres, alerts=args.alerts)
    finally:
        postgres.stop()

    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} s"

    rows = [
        ("alerts queued while Prefect was down", str(result.alerts)),
        ("API first answered after launch", s(result.first_healthy_s)),
        ("longest API silence after that", s(result.longest_silence_s)),
        ('"database is locked" in the log', str(result.locked_lines)),
        ("event loop blocked for 10 s or more", str(result.blocked_lines)),
        ("first run finished after launch", s(result.first_run_done_s)),
        ("last run finished after launch", s(result.last_run_done_s)),
        ("runs created", str(result.runs)),
        ("alert automations kept across the restart",
         "yes" if result.automations_before and result.automations_before == result.automations_after
         else "no (re-created)"),
        ("run states", ", ".join(f"{k} {v}" for k, v in sorted(result.states.items()))),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    return 0 if result.last_run_done_s is not None else 1
