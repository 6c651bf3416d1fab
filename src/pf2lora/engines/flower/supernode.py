"""Flower's SuperNode with a shorter wait between the pulls that find no message.

Flower 1.41's SuperNode asks its SuperLink for a message and, when there is none, sleeps 3 s
before it asks again (``time.sleep(3)`` in :mod:`flwr.supernode.start_client_internal`; no option
or environment variable sets it). The reply of a finished ClientApp is pushed, and the server's
next message pulled, only on the loop's next turn, so every exchange of a round waits up to 3 s
per node: on a run of short rounds on one machine that is much of the time a round takes. This
module runs Flower's own ``flower-supernode`` entry point, unchanged, with the waits of that one
module capped at ``interval`` seconds (its other wait, 0.5 s for a ClientApp's reply, is capped
alike). Over a wide-area network Flower's 3 s is the better choice: each pull is a request the
SuperLink serves.

    pf2lora supernode --pull-interval 0.2 --insecure --superlink HOST:9092 --isolation process ...
"""

from __future__ import annotations

import sys
import time
from types import ModuleType

DEFAULT_PULL_INTERVAL = 3.0  # Flower's own


def interval_problem(seconds: float) -> str | None:
    """Why ``seconds`` cannot be a pull interval (in (0, 3]: never longer than Flower's own), or None."""
    if not 0 < seconds <= DEFAULT_PULL_INTERVAL:
        return f"--pull-interval must be in (0, {DEFAULT_PULL_INTERVAL:g}] seconds, not {seconds:g}"
    return None


class CappedClock:
    """The :mod:`time` module as one Flower module sees it, with ``sleep`` capped at ``interval``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.interval))


def cap_waits(module: ModuleType, interval: float) -> None:
    """Cap the waits of ``module``, which must use the :mod:`time` module as ``time``."""
    if getattr(module, "time", None) is not time:
        raise RuntimeError(f"{module.__name__} no longer uses `time` as this Flower version did; cannot set its wait")
    module.time = CappedClock(interval)  # type: ignore[attr-defined]


def run(interval: float, flower_args: list[str]) -> int:
    """``flower-supernode FLOWER_ARGS`` with the wait between empty pulls at most ``interval`` s."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    if interval < DEFAULT_PULL_INTERVAL:
        cap_waits(start_client_internal, interval)
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0
