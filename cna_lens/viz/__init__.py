"""Viz: Plotly figures of circuits and sweeps, saving them, the report page, explore views.

Every figure function takes data and returns a ``plotly.graph_objects.Figure``; nothing
here shows or writes a figure unless asked (:func:`save_figures`, :func:`write_report`).

Imports: every layer below (models to evaluation).
"""

from cna_lens.viz.cards import (
    NeuronCard,
    ablation_effect,
    circuit_map,
    logit_lens,
    neuron_card,
    neuron_logits,
    refusal_token_ids,
)
from cna_lens.viz.explore import activation_cache, distribution_figure, token_strip, top_prompts
from cna_lens.viz.figures import SavedFigures, save_figures
from cna_lens.viz.plots import (
    capability_figure,
    dose_figure,
    layer_histogram,
    methods_figure,
    overlap_figure,
    pareto_figure,
    stability_figure,
    steering_figure,
)
from cna_lens.viz.report import write_report

__all__ = [
    "NeuronCard",
    "SavedFigures",
    "ablation_effect",
    "activation_cache",
    "capability_figure",
    "circuit_map",
    "distribution_figure",
    "dose_figure",
    "layer_histogram",
    "logit_lens",
    "methods_figure",
    "neuron_card",
    "neuron_logits",
    "overlap_figure",
    "pareto_figure",
    "refusal_token_ids",
    "save_figures",
    "stability_figure",
    "steering_figure",
    "token_strip",
    "top_prompts",
    "write_report",
]
