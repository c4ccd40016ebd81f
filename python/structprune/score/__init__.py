"""Scoring: calibration windows, the block-by-block execution of a checkpoint (``streaming``), the
importance estimators and the scorer that turns their statistics into per-unit scores, the
scoring journal behind ``--resume``, and scoring split over processes."""
