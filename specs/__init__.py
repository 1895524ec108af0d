"""jobledger's executable specifications: Markdown documents whose Python blocks run as tests.

This file only makes ``specs`` a package, so its ``conftest.py`` imports ``model`` and
``impl`` from the repository root however pytest is started.
"""
