"""cna_lens.pipelines."""
