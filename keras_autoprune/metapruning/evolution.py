"""`EvolutionarySearch`: the best gene under a cost window, scored without training.

Each iteration (Liu et al., section 3.3):

1. every candidate of the population not scored yet is scored (scores are
   kept by gene, in memory and optionally in a JSON file: a rerun with the
   same seed replays the same draws and reads the scores it already has,
   so an interrupted search resumes where it stopped and a finished one
   scores nothing new);
2. the ``parents`` best genes seen so far are kept;
3. the next population is ``mutations`` mutants of random parents (each
   choice redrawn with ``mutation_probability``), ``crossovers`` uniform
   crossovers of two random parents, and random genes up to
   ``population``.

Random genes cost about a third of the model on average, so for a mild
budget (a window near 0.75, say) almost none lands in the window. When the
random draws cannot fill a population, it is completed with *near-budget*
genes: the uniform gene at the widest choice ``k`` inside the budget and
the one at ``k + 1`` mixed, each group taking ``k + 1`` with a probability
drawn uniformly per gene (costs spread between the two uniform costs), then
mutated with ``mutation_probability``.

Every candidate is checked against the cost window
``low <= cost(gene) <= high`` *before* it is scored (a cost is a fraction of
the original model's FLOPs, parameters or estimated latency); a child
outside the window is discarded and redrawn, up to ``max_tries`` draws per
child. Same seed, same scores: same search.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable

import keras
import numpy as np

from keras_autoprune.metapruning.genes import Gene, GeneSpace


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """Sizes of the evolutionary search (defaults: the paper's).

    Attributes:
        population: candidates per iteration.
        parents: best genes kept as parents (the paper's top-k).
        mutations: mutants per iteration.
        crossovers: crossover children per iteration.
        iterations: number of iterations.
        mutation_probability: chance that a mutant redraws each choice.
        max_tries: draws allowed per child before giving up on it (the
            window may be narrow).
    """

    population: int = 50
    parents: int = 10
    mutations: int = 25
    crossovers: int = 25
    iterations: int = 20
    mutation_probability: float = 0.1
    max_tries: int = 100

    def __post_init__(self):
        for name in ("population", "parents", "iterations", "max_tries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1. Received: {name}={value!r}")
        for name in ("mutations", "crossovers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an int >= 0. Received: {name}={value!r}")
        if self.mutations + self.crossovers > self.population:
            raise ValueError(
                "`mutations + crossovers` children must fit in the `population`. Received: "
                f"mutations={self.mutations}, crossovers={self.crossovers}, population={self.population}"
            )
        if not 0 < self.mutation_probability <= 1:
            raise ValueError(f"`mutation_probability` must be in (0, 1]. Received: {self.mutation_probability!r}")


@dataclasses.dataclass
class SearchHistory:
    """What the search saw.

    Attributes:
        best_scores: best score found after each iteration.
        best_genes: the gene of each of those scores.
        scores: every scored gene and its score (the cache).
        costs: the cost fraction of every scored gene.
        rejected: candidates discarded for being outside the window.
    """

    best_scores: list[float] = dataclasses.field(default_factory=list)
    best_genes: list[Gene] = dataclasses.field(default_factory=list)
    scores: dict[Gene, float] = dataclasses.field(default_factory=dict)
    costs: dict[Gene, float] = dataclasses.field(default_factory=dict)
    rejected: int = 0


class EvolutionarySearch:
    """Searches ``space`` for the gene of highest ``score`` with ``low <= cost(gene) <= high``.

    Args:
        space: the `GeneSpace`.
        score: ``gene -> float``, higher is better (e.g. held-out accuracy of
            the PruningNet's weights for that gene).
        cost: ``gene -> fraction of the original cost``.
        high: the budget (largest cost fraction allowed).
        low: the smallest cost fraction allowed (the window's lower end).
        settings: `SearchSettings`.
        seed: seed of every random draw.
        cache_path: JSON file of scores: read at the start if it exists,
            rewritten after every scored gene. Costs are always recomputed.
        cache_key: what the scores depend on (e.g. a fingerprint of the
            PruningNet's weights and of the scoring data); a file written
            with another key or other ``scales`` is refused, not reused.
        verbose: 1 shows a progress bar per iteration, 0 is silent.
    """

    def __init__(self, space: GeneSpace, score: Callable[[Gene], float], cost: Callable[[Gene], float], high: float,
                 low: float = 0.0, settings: SearchSettings | None = None, seed: int = 0,
                 cache_path: str | os.PathLike | None = None, cache_key: str = "", verbose: int = 1):
        if not 0 <= low <= high:
            raise ValueError(f"Expected a window with 0 <= low <= high. Received: low={low}, high={high}")
        self.space = space
        self.score = score
        self.cost = cost
        self.low, self.high = float(low), float(high)
        self.settings = settings or SearchSettings()
        self.seed = seed
        self.cache_path = pathlib.Path(cache_path) if cache_path is not None else None
        self.cache_key = str(cache_key)
        self.verbose = verbose
        self.history = SearchHistory()
        self._cost_cache: dict[Gene, float] = {}
        self._stored: dict[Gene, float] = {}
        self._uniform_costs: list[float] | None = None  # cost of every uniform gene, for `_near_budget`
        if self.cache_path is not None and self.cache_path.exists():
            self._read_cache()

    def allowed(self, gene: Gene) -> bool:
        """Whether ``gene``'s cost fraction is inside the window (computed once per gene)."""
        if gene not in self._cost_cache:
            self._cost_cache[gene] = float(self.cost(gene))
        return self.low <= self._cost_cache[gene] <= self.high

    def run(self) -> tuple[Gene, float]:
        """Runs every iteration; returns the best gene and its score."""
        rng = np.random.default_rng(self.seed)
        settings = self.settings
        population = self.first_population(rng)
        for iteration in range(settings.iterations):
            self._score_all(population, iteration)
            ranked = sorted(self.history.scores.items(), key=lambda item: (-item[1], item[0]))
            ranked = [gene for gene, _ in ranked if self.allowed(gene)]
            best = ranked[0]
            self.history.best_genes.append(best)
            self.history.best_scores.append(self.history.scores[best])
            parents = ranked[: settings.parents]
            children = self._fill([], settings.mutations, rng, lambda: self.space.mutate(
                parents[rng.integers(len(parents))], rng, settings.mutation_probability))
            children = self._fill(children, settings.mutations + settings.crossovers, rng,
                                  lambda: self.space.crossover(*_two(parents, rng), rng))
            population = self._fill_random(children, rng)
        return self.history.best_genes[-1], self.history.best_scores[-1]

    def first_population(self, rng: np.random.Generator | None = None) -> list[Gene]:
        """The first population (needs costs only, no score), or a ValueError if no gene lands in the window.

        ``rng`` defaults to a fresh generator of ``seed``, the one `run` starts with: a check before a long
        PruningNet training sees the population the search will score.
        """
        rng = np.random.default_rng(self.seed) if rng is None else rng
        population = self._fill_random([], rng)
        if not population:
            raise ValueError(
                f"No gene of {len(self.space)} choices has a cost in [{self.low:.3f}, {self.high:.3f}] after "
                f"{2 * self.settings.max_tries * self.settings.population} draws (random, then near the budget). "
                "Fix: widen the window (a lower `low`), or use finer `scales` near the budget."
            )
        return population

    def _fill_random(self, genes: list[Gene], rng) -> list[Gene]:
        """``genes`` completed to ``population`` with random genes, then near-budget ones if those run short."""
        size = self.settings.population
        genes = self._fill(genes, size, rng, lambda: self.space.random(rng))
        if len(genes) < size:
            genes = self._fill(genes, size, rng, lambda: self._near_budget(rng))
        return genes

    def _near_budget(self, rng) -> Gene:
        """A mix of the uniform genes at the widest choice inside the budget and the next one, mutated."""
        if self._uniform_costs is None:
            self._uniform_costs = [float(self.cost(self.space.uniform(k))) for k in range(len(self.space.scales))]
        inside = [k for k, c in enumerate(self._uniform_costs) if c <= self.high]
        narrow = inside[-1] if inside else 0
        wide = min(narrow + 1, len(self.space.scales) - 1)
        pick = rng.random(len(self.space)) < rng.random()
        mixed = tuple(wide if p else narrow for p in pick)
        return self.space.mutate(mixed, rng, self.settings.mutation_probability)

    def _fill(self, genes: list[Gene], size: int, rng, draw) -> list[Gene]:
        genes = list(genes)
        target = size - len(genes)
        for _ in range(target * self.settings.max_tries):
            if len(genes) >= size:
                break
            gene = draw()
            if self.allowed(gene):
                genes.append(gene)
            else:
                self.history.rejected += 1
        return genes

    def _score_all(self, population: list[Gene], iteration: int) -> None:
        todo = [g for g in dict.fromkeys(population) if g not in self.history.scores]
        bar = keras.utils.Progbar(len(todo), verbose=self.verbose, unit_name="candidate",
                                    stateful_metrics=["best"]) if todo and self.verbose else None
        if self.verbose:
            print(f"Iteration {iteration + 1}/{self.settings.iterations}: {len(todo)} new candidates "
                  f"({len(population) - len(todo)} cached)")
        for i, gene in enumerate(todo):
            stored = self._stored.get(gene)
            self.history.scores[gene] = float(self.score(gene)) if stored is None else stored
            self.history.costs[gene] = self._cost_cache[gene]
            if self.cache_path is not None and stored is None:
                self._stored[gene] = self.history.scores[gene]
                self._write_cache()
            if bar is not None:
                best = max(self.history.scores.values())
                bar.update(i + 1, values=[("best", best)])

    def _read_cache(self) -> None:
        stored = json.loads(self.cache_path.read_text())
        scales, key = tuple(stored.get("scales", ())), stored.get("key", "")
        if scales != tuple(self.space.scales) or key != self.cache_key:
            raise ValueError(
                f"The score cache '{self.cache_path}' was written for scales {scales} and key {key!r}; this search "
                f"has scales {tuple(self.space.scales)} and key {self.cache_key!r}, so its scores do not apply. "
                "Fix: use another `cache_path`, or delete the file to score again."
            )
        for row in stored.get("scores", []):
            self._stored[self.space.check(row["gene"])] = float(row["score"])

    def _write_cache(self) -> None:
        rows = [{"gene": list(g), "score": s} for g, s in self._stored.items()]
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"scales": list(self.space.scales), "key": self.cache_key, "scores": rows}))
        os.replace(tmp, self.cache_path)


def _two(parents: list[Gene], rng: np.random.Generator) -> tuple[Gene, Gene]:
    """Two different parents (the same one twice when there is only one)."""
    if len(parents) < 2:
        return parents[0], parents[0]
    first, second = rng.choice(len(parents), 2, replace=False)
    return parents[first], parents[second]
