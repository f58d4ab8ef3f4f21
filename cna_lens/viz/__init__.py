"""cna_lens.viz."""
