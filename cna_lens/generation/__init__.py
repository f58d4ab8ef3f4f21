"""cna_lens.generation."""
