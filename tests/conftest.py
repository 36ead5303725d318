"""Shared fixtures: tiny random models built from configs (tests/fixtures/models.py) and the
real services — PostgreSQL, an S3 server over HTTP (tests/fixtures/services.py)."""

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.services",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.stack",
]
