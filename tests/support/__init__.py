"""Helpers the tests share, imported as ``support.<module>`` (tests/ is on sys.path: pytest
puts it there for tests/conftest.py). hub_mirror.py is a script, not a helper."""
