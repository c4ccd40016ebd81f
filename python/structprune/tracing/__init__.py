"""Tracing: a model's config → the traced-graph IR (``export``, torch.export on the meta device) →
the prunable structures the Rust core finds in it (``graph``). No weights are read."""
