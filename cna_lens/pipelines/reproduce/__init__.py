"""cna_lens.pipelines.reproduce: the paper's claims checked on a model, in stages."""

from cna_lens.pipelines.reproduce.run import *  # noqa: F401,F403
from cna_lens.pipelines.reproduce.run import __all__  # noqa: F401
