"""Shared library of the stages: settings schema, atomic file output, run-time environment."""
