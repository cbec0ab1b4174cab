"""MySQL / MariaDB runbooks: one module per deployment, named for it."""
