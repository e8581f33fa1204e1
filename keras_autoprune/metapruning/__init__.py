"""MetaPruning (Liu et al., ICCV 2019): a PruningNet and an evolutionary search.

>>> result = kap.metapruning.search(model, train_ds, kap.Budget(flops=0.5),
...                                 validation_data=held_out)   # doctest: +SKIP

See `keras_autoprune.metapruning.search` and docs/methods/metapruning.md.
"""

from keras_autoprune.metapruning.evolution import EvolutionarySearch, SearchHistory, SearchSettings
from keras_autoprune.metapruning.genes import DEFAULT_SCALES, GeneSpace
from keras_autoprune.metapruning.latency import LatencyCheck, LatencyTable, LayerTiming, check_latency
from keras_autoprune.metapruning.pruningnet import GeneSampler, PruningNet
from keras_autoprune.metapruning.scoring import CandidateScorer, cost_function, uniform_gene
from keras_autoprune.metapruning.search import SearchResult, fingerprint, search
from keras_autoprune.metapruning.training import SmoothedCrossentropy, train_pruningnet

__all__ = [
    "CandidateScorer",
    "DEFAULT_SCALES",
    "EvolutionarySearch",
    "GeneSampler",
    "GeneSpace",
    "LatencyCheck",
    "LatencyTable",
    "LayerTiming",
    "PruningNet",
    "SearchHistory",
    "SearchResult",
    "SearchSettings",
    "SmoothedCrossentropy",
    "check_latency",
    "cost_function",
    "fingerprint",
    "search",
    "train_pruningnet",
    "uniform_gene",
]
