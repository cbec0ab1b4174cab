"""Run a benchmark: `python -m bench trigger-latency [--alerts 50]`, `python -m bench alert-storm`,
`python -m bench dlq-triage`."""

from __future__ import annotations

import sys

from bench import alert_storm, dlq_triage, trigger_latency

BENCHMARKS = {
    "trigger-latency": trigger_latency.main,
    "alert-storm": alert_storm.main,
    "dlq-triage": dlq_triage.main,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m bench {{{'|'.join(BENCHMARKS)}}} [options]")
        return 2
    return BENCHMARKS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
