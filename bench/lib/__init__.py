"""The benchmarks' support library: what more than one script under bench/ uses.

The scripts run as ``python bench/<script>.py``, so bench/ is first on their import path
and they import this package as ``lib``; no script imports another script.
"""
