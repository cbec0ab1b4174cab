"""Redis runbooks: one module per deployment, named for it."""
