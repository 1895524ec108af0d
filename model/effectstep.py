"""``run_effect`` as durable steps: the decision logic once, driven by sync or async code.

``run_effect`` has three durable steps (record the start, call ``fn``, record the result)
and the user's code runs between them with no transaction open. A store exposes them as a
generator, :data:`EffectSteps`: it runs each durable step itself and *yields* when the
caller must run user code: :class:`RunFn` (call ``fn``; send back its result, or throw its
``Exception`` into the generator) or :class:`Probe` (call the ``on_doubt`` probe; send
back what it returned). The generator returns the effect's result.

:func:`run_steps` drives it synchronously (every store's ``run_effect``); ``impl.aio``
drives the same generator with ``fn`` and the probe awaited on the event loop and the
durable steps run on the store's own thread. Both drivers share every decision, so the
sync and async faces cannot disagree on what an effect does.

What a driver must not do: throw anything but an ``Exception`` raised by ``fn`` into the
generator. A driver that stops (a crash, a cancelled task, a probe that raised) simply
closes the generator at the yield: no durable step runs, so a start already recorded
stays, exactly as if the process had died there.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Protocol

from attrs import frozen

from model.key import Scalar
from model.record import JSON, DoubtInfo, EffectContext, Lease
from model.store import EffectFn, OnDoubt, Store


@frozen
class RunFn:
    """The start is recorded: call ``fn(context)`` now and send back its result."""

    context: EffectContext


@frozen
class Probe:
    """A dead lease's start is pending: call ``on_doubt(info)`` and send back its answer."""

    info: DoubtInfo


EffectSteps = Generator[RunFn | Probe, object, JSON]
"""A ``run_effect`` in progress: yields what user code to run, returns the result."""


def run_steps(steps: EffectSteps, fn: EffectFn, on_doubt: OnDoubt) -> JSON:
    """Drive ``steps`` to the end, calling ``fn`` and the probe in this thread.

    Returns:
        The effect's recorded (or replayed) result.

    Raises:
        Whatever the steps raise (``LeaseLost``, ``EffectInDoubt``, ...), ``fn``'s own
        exception unchanged, and the probe's exception.
    """
    try:
        step = next(steps)
        while True:
            if isinstance(step, RunFn):
                try:
                    result = fn(step.context)
                except Exception as exc:
                    step = steps.throw(exc)
                    continue
                step = steps.send(result)
            else:
                assert callable(on_doubt)
                step = steps.send(on_doubt(step.info))
    except StopIteration as stop:
        done: JSON = stop.value
        return done
    finally:
        steps.close()


class SteppedStore(Store, Protocol):
    """A store whose ``run_effect`` can also be driven step by step (every backend)."""

    def effect_steps(
        self,
        lease: Lease,
        op: str,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: OnDoubt = "retry",
        then: str | None = None,
    ) -> EffectSteps:
        """``run_effect`` without calling ``fn`` or the probe: they are yielded instead.

        Nothing runs until the first ``next``; ``on_doubt`` is only inspected (is it
        "raise", "retry" or callable), never called.
        """
        ...
