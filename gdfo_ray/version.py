"""The package's version, in a leaf module so that the modules recording it import nothing above them."""

__version__ = "0.1.0"  # as pyproject.toml's (tests/test_core_imports.py checks they agree)
