"""Run a benchmark: `python -m bench trigger-latency [--alerts 50]`, `python -m bench alert-storm`,
`python -m bench stuck-reset [--stuck 100000]`."""

from __future__ import annotations

import importlib
import sys

# imported only when chosen: stuck-reset sets Prefect's environment before Prefect is imported
BENCHMARKS = {
    "trigger-latency": "bench.trigger_latency",
    "alert-storm": "bench.alert_storm",
    "stuck-reset": "bench.stuck_reset",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m bench {{{'|'.join(BENCHMARKS)}}} [options]")
        return 2
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
