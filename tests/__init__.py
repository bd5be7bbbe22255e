"""The test suite: a package, so each helper module (conftest, pdproc, ...) is loaded once, as tests.<name>."""
