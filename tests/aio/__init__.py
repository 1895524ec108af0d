"""Tests of impl.aio: the async store, the AsyncWorker, cancellation and a free loop."""
