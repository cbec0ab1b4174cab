"""Notification runbooks: push delivery through FCM and APNs."""
