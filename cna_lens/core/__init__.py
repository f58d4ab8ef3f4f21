"""cna_lens.core."""
