"""cna_lens.models."""
