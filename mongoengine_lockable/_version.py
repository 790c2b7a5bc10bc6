"""The version of the package (read by the build as well: see setup.cfg)."""

__version__ = "0.2.0"
