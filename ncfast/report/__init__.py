"""Reading run directories and turning them into figures, tables, summaries and data frames.

:mod:`~ncfast.report.runs` reads ``metrics.jsonl`` and ``config.json``; :mod:`~ncfast.report.plots`
draws HPD22's Figs. 2–12; :mod:`~ncfast.report.tables` writes Table 1;
:mod:`~ncfast.report.summary` formats ``ncfast analyze``'s report; :func:`read_runs`
(:mod:`~ncfast.report.frame`) returns every run's metrics as one pandas DataFrame.
"""

from ncfast.report.frame import read_runs

__all__ = ["read_runs"]
