"""The planner: a machine profile, a cost model over the step DAG, and a search under caps.

- :mod:`pipo.planner.profile` / :mod:`pipo.planner.probe`: ``pipo probe``'s measurements, cached
  per machine;
- :mod:`pipo.planner.costs`: task durations from a profile;
- :mod:`pipo.planner.estimate`: a plan's step graphs replayed on the virtual clock
  (:mod:`pipo.runtime.simulate`);
- :mod:`pipo.planner.search`: the search (:func:`plan_run`) under :class:`Caps`, with :class:`Pins`;
- :mod:`pipo.planner.engine_plan` / :mod:`pipo.planner.explain`: the engine's and ``pipo plan``'s use.

See docs/planning.md.
"""

from pipo.planner.search import Caps, Pins, PlannerResult, Request, plan_run

__all__ = ["Caps", "Pins", "PlannerResult", "Request", "plan_run"]
