"""Timing several ways of doing one job on a shared machine: the ways alternate within every round
(the order reversed every other round), so that each round's ratio compares runs seconds apart, and
the load average is read before and after."""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Mapping, Tuple


def time_interleaved(runs: Mapping[str, Callable[[], object]], rounds: int) -> Tuple[Dict[str, List[float]], float, float]:
    """Seconds of every run of every way, by name, and the load average before and after."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    load_start = os.getloadavg()[0]
    for round_index in range(rounds):
        for name in (list(runs) if round_index % 2 == 0 else list(runs)[::-1]):
            started = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - started)
    return times, load_start, os.getloadavg()[0]
