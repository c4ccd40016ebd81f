"""Writes demo/example-plan.json: a hand-chosen cut of the demo model made with structprune's own
structures (every other MLP channel and the second KV group in every layer). It shows the plan
format and `structprune apply` before any scoring is involved; `structprune prune` chooses units by
importance instead.

    python demo/make_example_plan.py
"""

from __future__ import annotations

from pathlib import Path

import structprune
from structprune.plan.cuts import Selection, checkpoint_cut_plan

DEMO = Path(__file__).resolve().parent


def main() -> None:
    model = DEMO / "model"
    graph = structprune.trace(model)
    selection = Selection()
    for structure in graph.by_kind("channels"):
        selection.units[structure.id] = list(range(1, structure.units, 2))
    for structure in graph.by_kind("kv_groups"):
        selection.units[structure.id] = [structure.units - 1]
    plan = checkpoint_cut_plan(model, graph, selection, metadata={"method": "example: every other MLP channel, last KV group"})
    plan.save(DEMO / "example-plan.json")
    print(f"wrote {DEMO / 'example-plan.json'}")


if __name__ == "__main__":
    main()
