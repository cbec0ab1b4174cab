"""Runbooks of access and credentials: rotation and audit."""
