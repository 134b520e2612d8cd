"""The search tests: a package, so its conftest (the PostgreSQL server) does not shadow tests/conftest.py."""
