"""Reading run directories and turning them into figures, tables and summaries.

:mod:`~ncfast.report.runs` reads ``metrics.jsonl`` and ``config.json``; :mod:`~ncfast.report.plots`
draws HPD22's Figs. 2–12; :mod:`~ncfast.report.tables` writes Table 1;
:mod:`~ncfast.report.summary` formats ``ncfast analyze``'s report.
"""
