"""Alembic migrations of the prefixd schema (shipped inside the package)."""
