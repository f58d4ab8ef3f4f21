"""Tune: the sparsest circuit steering that removes refusal without damage, in minutes.

* :mod:`~cna_lens.pipelines.tune.config` — :class:`TuneConfig` and the run's prompt sets;
* :mod:`~cna_lens.pipelines.tune.search` — trial parameters -> steering -> objectives,
  the Pareto front;
* :mod:`~cna_lens.pipelines.tune.confirm` — held-out confirmation and the choice;
* :mod:`~cna_lens.pipelines.tune.run` — :func:`tune`, and :func:`validate_proxy`.
"""

from cna_lens.pipelines.tune.config import TuneConfig, TunePrompts, load_tune_prompts
from cna_lens.pipelines.tune.run import TuneResult, tune, validate_proxy

__all__ = ["TuneConfig", "TunePrompts", "TuneResult", "load_tune_prompts", "tune", "validate_proxy"]
