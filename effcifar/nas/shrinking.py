"""Search-space shrinking: after chosen epochs, each choice key loses the candidate whose subnets judge worst.

A supernet run's settings for it are its `shrinking` group (`ShrinkingFields`); the trainer's
`SpaceShrinking` hook applies them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from effcifar.config import field_error, setting
from effcifar.nas.space import Arch, ArchSpace, skip_depth


@dataclass
class ShrinkingFields:
    """When the space shrinks and on how many subnets each candidate is judged (`SupernetConfig.shrinking`)."""

    shrink_at: str = setting("", "comma-separated epochs after which each key loses its worst candidate")
    shrink_samples: int = setting(10, "each candidate is judged on at least this many subnets")

    def epochs(self, run_epochs: int) -> list[int]:
        """The epochs of `shrink_at` in a run of `run_epochs`, checked (ConfigError with `field`)."""
        if self.shrink_samples <= 0:
            raise field_error("shrink_samples", "a positive integer", self.shrink_samples)
        try:
            epochs = [int(e) for e in self.shrink_at.replace(" ", "").split(",") if e]
        except ValueError:
            raise field_error("shrink_at", "comma-separated epoch numbers, e.g. 10,20", self.shrink_at) from None
        if any(not 1 <= e < run_epochs for e in epochs) or len(set(epochs)) != len(epochs):
            raise field_error("shrink_at", f"distinct epochs in [1, {run_epochs - 1}]", self.shrink_at)
        return sorted(epochs)


def shrink_space(space: ArchSpace, samples: int, seed: int,
                 evaluate: Callable[[Arch], float]) -> tuple[ArchSpace, dict[str, Any]]:
    """Drop the worst candidate of every key (never the last), judged over sampled subnets.

    Subnets come in rounds: in each round every key walks through a random permutation of its
    candidates. A candidate's score is the mean accuracy of the subnets where it is active (a
    body conv beyond the skip depth is not), so body candidates that were not active in
    `samples` subnets get extra subnets with the deepest skip. Keys that no skip can reach are
    kept whole.
    """
    rng = random.Random(seed)
    choices = space.choices()
    width = space.most_candidates()
    archs = []
    for _ in range(samples):
        perms = {k: rng.sample(c, len(c)) for k, c in choices.items()}
        archs += [{k: p[j % len(p)] for k, p in perms.items()} for j in range(width)]
    counts = {k: {c: 0 for c in v} for k, v in choices.items()}
    for arch in archs:
        for key in space.active_keys(arch):
            counts[key][arch[key]] += 1
    for key, candidates in choices.items():
        skip_key = key.rsplit(".", 1)[0] + ".skip"
        deepest = {skip_key: max(choices[skip_key], key=skip_depth)} if skip_key in choices else {}
        for candidate in candidates:
            while counts[key][candidate] < samples and key in space.active_keys({**archs[0], **deepest}):
                arch = {k: rng.choice(c) for k, c in choices.items()} | {key: candidate, **deepest}
                archs.append(arch)
                for active in space.active_keys(arch):
                    counts[active][arch[active]] += 1
    scores: dict[str, dict[str, list[float]]] = {k: {c: [] for c in v} for k, v in choices.items()}
    for arch in archs:
        acc = evaluate(arch)
        for key in space.active_keys(arch):
            scores[key][arch[key]].append(acc)
    kept, dropped, means = {}, {}, {}
    for key, by_candidate in scores.items():
        means[key] = {c: (sum(v) / len(v) if v else None) for c, v in by_candidate.items()}
        kept[key] = list(choices[key])
        if len(kept[key]) > 1 and all(v is not None for v in means[key].values()):
            worst = min(reversed(kept[key]), key=lambda c: means[key][c])
            kept[key].remove(worst)
            dropped[key] = worst
    record = {"subnets": len(archs), "dropped": dropped, "scores": means, "counts": counts}
    return space.restrict(kept), record
