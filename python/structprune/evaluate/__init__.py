"""Evaluation: held-out perplexity (``perplexity``), parameters, MACs and speed (``costs``), zero-shot
tasks, the ``eval`` report, and the ``sweep`` of estimators and ratios."""
