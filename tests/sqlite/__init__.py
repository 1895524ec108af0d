"""Tests specific to the SQLite backend: transactions, pragmas, faults, crashes, processes."""
