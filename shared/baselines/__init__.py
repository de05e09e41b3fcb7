"""Baselines measured in the same harness and on the same split as fedrec.

Each baseline is a :class:`~fedrec.shared.evaluation.Scorer` built by ``fit(split, **params)``.
Collaborative baselines are tuned on protocol A's validation queries (never on test); their
chosen hyper-parameters are reused for protocols B and C. Run:
``fedrec baselines --protocol A --out runs/baselines-A``.
"""

from fedrec.shared.baselines.runner import BASELINES, run_baselines

__all__ = ["BASELINES", "run_baselines"]
