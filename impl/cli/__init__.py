"""The ``jobledger`` command: an operator's view of a store, and the actions to steer it.

Each command group lives in its own module and stays thin (parse, call the library,
format); :mod:`impl.cli.main` assembles them, and :mod:`impl.cli.exit` maps every
expected error to its exit code in one place.
"""
