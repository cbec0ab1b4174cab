"""A small HTTP service with a health endpoint, for the supervisord tests.

``python health_service.py --port P [--name NAME] [--hang-file F] [--exit-file F]``

- ``GET /health`` answers 200 ``ok <name> pid=<pid>``; while ``--hang-file`` exists it never
  answers (a hung service whose process is alive); when ``--exit-file`` exists the process exits
  with status 3 (at start too: a service that crashes as soon as it starts).
- ``GET /say?line=TEXT[&stream=stderr]`` prints TEXT as one line on stdout (or stderr), so a test
  knows exactly what the program printed.

Tests also hang it with SIGSTOP and kill it with SIGKILL from outside.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

EXIT_STATUS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="health-service")
    parser.add_argument("--hang-file", type=Path)
    parser.add_argument("--exit-file", type=Path)
    args = parser.parse_args()

    def exit_if_asked() -> None:
        if args.exit_file and args.exit_file.exists():
            print(f"{args.name}: exit file {args.exit_file} found, exiting", file=sys.stderr,
                  flush=True)
            os._exit(EXIT_STATUS)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urlsplit(self.path)
            exit_if_asked()
            if url.path == "/health":
                while args.hang_file and args.hang_file.exists():
                    time.sleep(0.1)
                self._answer(200, f"ok {args.name} pid={os.getpid()}")
            elif url.path == "/say":
                query = parse_qs(url.query)
                stream = sys.stderr if query.get("stream") == ["stderr"] else sys.stdout
                print(query.get("line", [""])[0], file=stream, flush=True)
                self._answer(200, "said")
            else:
                self._answer(404, "not found")

        def _answer(self, status: int, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # request lines would crowd out what the tests print

    exit_if_asked()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"{args.name} listening on 127.0.0.1:{args.port} pid={os.getpid()}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
