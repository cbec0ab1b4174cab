"""Run a benchmark: `python -m bench trigger-latency [--alerts 50]`, `python -m bench alert-storm`,
`python -m bench stuck-reset [--stuck 100000]`."""

from __future__ import annotations

import sys

from bench import alert_storm, stuck_reset, trigger_latency

BENCHMARKS = {
    "trigger-latency": trigger_latency.main,
    "alert-storm": alert_storm.main,
    "stuck-reset": stuck_reset.main,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m bench {{{'|'.join(BENCHMARKS)}}} [options]")
        return 2
    return BENCHMARKS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
