"""`deferred_refinements`: the trackers' accelerator path on any device, for tests and
benchmarks on a machine without a GPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import laser_fx.tracker

__all__ = ["deferred_refinements"]


@contextlib.contextmanager
def deferred_refinements() -> Iterator[None]:
    """While inside, every tracker decides as on an accelerator (`laser_fx._decisions.defers`
    is true): a refinement queues its power iteration and takes its Ritz step at the next
    call, or at the end of the forward after every tracker has queued its own."""
    with mock.patch.object(laser_fx.tracker, "defers", lambda x: True):
        yield
