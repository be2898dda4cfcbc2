"""The package version: the one place that holds it (setup.cfg reads it with `attr:`)."""

__version__ = "0.1.0"
