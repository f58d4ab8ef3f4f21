import cna_lens


def test_public_names_exist():
    for name in cna_lens.__all__:
        assert hasattr(cna_lens, name), name
