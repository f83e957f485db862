"""``devagent chaos``: live migrations under faults, with every invariant checked after each.

:mod:`.draw` draws the runs from a seed (pure), :mod:`.faults` does the faults to a lab,
:mod:`.runner` runs the migrations, :mod:`.checks` checks the invariants, :mod:`.record`
keeps each run and makes the table of fault by phase.
"""
