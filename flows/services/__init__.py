"""Runbooks for services wherever they run (Kubernetes, Docker hosts, supervisord): issue #12."""
