"""Small real programs the tests run under supervisord (tests/supervisor_server.py)."""
