"""SIGTERM handled like Ctrl-C while structprune writes, so a terminated run removes its staged
output (``.OUT.structprune-tmp-PID-N``) before the process ends.

SIGTERM's default action kills the process on the spot, which leaves the staged directory behind
(up to the output's size). While a writer runs, :func:`cleanup_on_sigterm` turns SIGTERM into a
:class:`Terminated` exception instead: it unwinds like ``KeyboardInterrupt`` (the engine cancels and
removes its staging, ``except BaseException`` blocks clean up), and once it leaves the ``with``
block the process ends by SIGTERM after all, with the status its parent expects. A handler
someone else installed is left alone.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Iterator, Optional


class Terminated(BaseException):
    """SIGTERM arrived. A ``BaseException``, so ``except Exception`` does not swallow it."""


def _raise_terminated(signum: int, frame: Optional[FrameType]) -> None:
    raise Terminated(f"terminated by signal {signum}")


@contextmanager
def cleanup_on_sigterm() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` (main thread, default disposition only);
    when it escapes the block the process is terminated by SIGTERM. Nested uses are no-ops."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered before kill() returns: the process ends here
        raise
    finally:
        if signal.getsignal(signal.SIGTERM) is _raise_terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


__all__ = ["Terminated", "cleanup_on_sigterm"]
