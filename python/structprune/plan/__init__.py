"""Planning: from scores to units removed (``selection``), from units to a cut plan
(``cuts``; the plan data is ``cut_plan``), and the refits of the kept weights that a plan may
carry (``reconstruct``, ``compensation``)."""
