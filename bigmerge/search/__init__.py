"""Searching merge coefficients against evaluation scores: ``bigmerge search CONFIG --out DIR``.

CMA-ES (or greedy soup) over a space of merge parameters, each candidate merged (in memory when
the model fits one process) and scored with lm-eval; see ``bigmerge.search.run``.
"""
