"""cna_lens.steering.hooks."""
