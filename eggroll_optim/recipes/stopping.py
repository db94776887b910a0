"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM.

:func:`stop_requests` turns the first signal into a request that the training loop reads between
steps (so the step in progress completes and the checkpoint it saves resumes exactly); a second
signal raises ``KeyboardInterrupt`` at once. :class:`Interrupted` is what the loop raises once it
has saved the checkpoint and a summary with status ``"interrupted"``; the CLI exits 130.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

__all__ = ["Interrupted", "stop_requests"]


class Interrupted(Exception):
    """A run stopped by a signal after saving its checkpoint and a summary with status ``"interrupted"``."""

    def __init__(self, experiment: str, signal_name: str, step: int, out: Path):
        super().__init__(f"{experiment} stopped by {signal_name} after step {step}; checkpoint and summary "
                         f"saved in {out} (continue with --resume)")
        self.step, self.out = step, out


@contextmanager
def stop_requests():
    """SIGINT/SIGTERM append their name to the yielded list (read between steps); a second one
    raises ``KeyboardInterrupt`` at once. Outside the main thread signals are left alone."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def request_stop(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)
        print(f"\neggroll: {received[0]}: stopping after this step (again to stop at once)", file=sys.stderr)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
