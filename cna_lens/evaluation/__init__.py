"""cna_lens.evaluation.metrics."""
