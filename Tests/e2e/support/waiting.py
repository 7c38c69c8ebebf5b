"""Bounded waits for events.

No fixed sleeps are used for synchronisation: every wait polls for an event
(a listening socket, an established connection, a successful round trip)
under an explicit deadline with a short, growing backoff.
"""

from __future__ import annotations

import time
from typing import Callable, Optional


class WaitTimeout(AssertionError):
    """A bounded wait ended before its event happened (fails the test)."""


class ProcessDied(AssertionError):
    """A process that a wait depends on has exited: waiting longer is pointless."""


def wait_for(predicate: Callable[[], object], timeout: float, what: str, first_delay: float = 0.02,
             max_delay: float = 0.25) -> object:
    """Call predicate until it returns a truthy value or timeout seconds pass.

    The short sleeps between attempts are backoff for polling an event, never
    a synchronisation by themselves.
    """
    deadline = time.monotonic() + timeout
    delay = first_delay
    last_exc: Optional[BaseException] = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except ProcessDied:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last_exc = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, max_delay)
