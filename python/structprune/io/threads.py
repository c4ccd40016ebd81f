"""How many threads torch computes with (``--threads`` of the commands that run a model).

torch starts one OpenMP thread per CPU, and its threads spin waiting for each other: on a machine
whose CPUs other processes keep busy, a step waits for the slowest thread to be scheduled and
runs many times slower than with fewer threads (benches/bench_threads.py, docs/benchmarks.md).
But the thread count also decides how torch splits its sums, so it changes the last bits of
scores and refitted weights, and with them the output's bytes (two runs of ``prune`` with 1 and 2
threads wrote different files). A default that followed the machine's load would make the same
command write different bytes from one minute to the next; so the default is fixed for a machine:
``OMP_NUM_THREADS`` when set (the user's word), else the CPUs this process may use. On a busy
machine, ``--threads`` lower than that is much faster (``--threads 1`` ran SmolLM2's
forward+backward 7× faster at load 10–13 on 2 CPUs), and stays reproducible run to run.
"""

from __future__ import annotations

import os
from typing import Optional


def default_torch_threads() -> int:
    """``OMP_NUM_THREADS`` when set to a positive number, else the CPUs this process may use."""
    stated = os.environ.get("OMP_NUM_THREADS", "").strip()
    if stated.isdigit() and int(stated) > 0:
        return int(stated)
    return usable_cpus()


def configure_torch_threads(requested: Optional[int]) -> int:
    """Sets torch's intra-op threads to ``requested`` or the default above; returns the count."""
    import torch

    threads = requested if requested is not None else default_torch_threads()
    torch.set_num_threads(threads)
    return threads


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
