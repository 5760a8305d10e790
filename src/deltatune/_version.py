"""The package version, in one place (imported by the package, the config writer and packaging)."""

__version__ = "0.2.0.dev0"
