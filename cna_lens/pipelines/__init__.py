"""Pipelines: whole jobs built from the layers below.

* :mod:`~cna_lens.pipelines.reproduce` — the paper's claims checked on a model, in stages;
* :mod:`~cna_lens.pipelines.pairs` — untuned/tuned pairs on pretrained weights (training,
  merging, the behaviour check).

Imports: every library layer below (never the CLI).
"""
