"""jobledger's benchmarks: each one measured against its physical limit in the same run.

Run ``python -m bench`` (or ``python -m bench --quick``) from the project root; see
``bench/README.md``. Nothing here is part of the test suite: performance is measured,
never asserted by a test.
"""
