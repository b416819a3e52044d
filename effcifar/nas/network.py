"""The supernet as nn.Modules: NNI-style choice modules, search stages, the supernet and standalone networks.

The supernet holds every candidate of a space; `set_arch` selects one per key and the forward
pass runs only the chosen ops (body convolutions past the chosen skip depth are not run). The
same class builds a standalone network from a space fixed to one architecture (`ArchSpace.fix`),
whose parameters are exactly those of the chosen ops and keep the supernet's names.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from effcifar.nas.ops import SlicedConv2d, make_head, make_op
from effcifar.nas.space import ArchSpace, StageSpec, resolve_width, skip_depth


class LayerChoice(nn.Module):
    """One of several candidate modules, picked by `chosen` (NNI's LayerChoice, single path)."""

    def __init__(self, key: str, candidates: Mapping[str, nn.Module]):
        super().__init__()
        self.key = key
        self.candidates = nn.ModuleDict(candidates)
        self.chosen: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self.candidates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chosen is None:
            raise RuntimeError(f"{self.key}: no candidate chosen; call set_arch first")
        return self.candidates[self.chosen](x)


class InputChoice(nn.Module):
    """Picks one of several inputs by name (NNI's InputChoice with n_chosen=1)."""

    def __init__(self, key: str, names: Sequence[str]):
        super().__init__()
        self.key = key
        self.names = list(names)
        self.chosen: str | None = None

    @property
    def chosen_index(self) -> int:
        if self.chosen is None:
            raise RuntimeError(f"{self.key}: no input chosen; call set_arch first")
        return self.names.index(self.chosen)

    def forward(self, inputs: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
        return inputs[self.chosen_index]


class WidthChoice(nn.Module):
    """A stage's width, picked by `chosen` among its candidates (no weights: the stage's sliced ops use it)."""

    def __init__(self, key: str, channels: Mapping[str, int]):
        super().__init__()
        self.key = key
        self.channels = dict(channels)  # candidate -> channels
        self.chosen: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self.channels)

    @property
    def active(self) -> int:
        if self.chosen is None:
            raise RuntimeError(f"{self.key}: no width chosen; call set_arch first")
        return self.channels[self.chosen]


class ChoiceStage(nn.Module):
    """conv1 (downsampling), body layers, and (if the stage has one) the skip that adds a body output back to conv1's.

    `sliced`: the ops are elastic (see SlicedConv2d), as in a stage with several widths or after one.
    """

    def __init__(self, spec: StageSpec, c_in: int, c_out: int, widths: Mapping[str, int] | None = None,
                 sliced: bool = False):
        super().__init__()
        self.conv1 = LayerChoice(f"{spec.name}.conv1", {op: make_op(op, c_in, c_out, sliced) for op in spec.conv1})
        self.body = nn.ModuleDict({
            f"conv{i + 2}": LayerChoice(f"{spec.name}.conv{i + 2}",
                                        {op: make_op(op, c_out, c_out, sliced) for op in ops})
            for i, ops in enumerate(spec.body)
        })
        self.skip = InputChoice(f"{spec.name}.skip", spec.skip) if spec.skip else None
        self.depths = [skip_depth(name) for name in spec.skip]
        if widths:
            self.width = WidthChoice(f"{spec.name}.width", widths)

    def apply_width(self) -> None:
        """Point the stage's sliced convs at the chosen width (all channels without a width choice)."""
        active = self.width.active if hasattr(self, "width") else None
        for module in self.modules():
            if isinstance(module, SlicedConv2d):
                module.active_out = active

    @property
    def depth(self) -> int:
        """Body layers the chosen path computes."""
        return len(self.body) if self.skip is None else self.depths[self.skip.chosen_index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.skip is None:
            for layer in self.body.values():
                x = layer(x)
            return x
        taps = [x]  # taps[d]: the output after d body convs; only those needed are computed
        for conv in list(self.body.values())[:self.depth]:
            taps.append(conv(taps[-1]))
        skip = self.skip([taps[d] if 0 < d < len(taps) else None for d in self.depths])
        return x if skip is None else x + skip


class Supernet(nn.Module):
    """Stem, search stages and the declared head; `set_arch` picks the path the forward pass runs."""

    def __init__(self, space: ArchSpace, channels: Mapping[str, int], num_classes: int, logits_weight: float = 0.125):
        super().__init__()
        self.space = space
        c_in = resolve_width(space.stem_width, channels)
        self.prep = make_op(space.stem_op, 3, c_in)
        stages, elastic = {}, False  # elastic: the previous stage's width varies
        for spec in space.stages:
            widths = spec.candidate_channels(channels)
            c_out = spec.max_channels(channels)
            stages[spec.name] = ChoiceStage(spec, c_in, c_out, widths, sliced=elastic or len(widths) > 1)
            c_in, elastic = c_out, len(widths) > 1
        self.stages = nn.ModuleDict(stages)
        self.head = make_head(space.head, c_in, num_classes, logits_weight, sliced=elastic)
        if space.size() == 1:  # a standalone network: its only architecture is always active
            self.set_arch({k: v[0] for k, v in space.choices().items()})

    def choice_modules(self) -> dict[str, LayerChoice | InputChoice | WidthChoice]:
        """Choice key -> its module."""
        return {m.key: m for m in self.modules() if isinstance(m, (LayerChoice, InputChoice, WidthChoice))}

    def set_arch(self, arch: Mapping[str, str]) -> None:
        """Select one candidate per key (checked against the space); later forwards run only that path."""
        modules = self.choice_modules()
        for key, candidate in self.space.check(arch).items():
            modules[key].chosen = candidate
        for stage in self.stages.values():
            stage.apply_width()

    def inactive_parameters(self) -> list[nn.Parameter]:
        """Parameters the current path does not use (unchosen candidates, body convs past the skip)."""
        unused = []
        for stage in self.stages.values():
            for index, choice in enumerate([stage.conv1, *stage.body.values()]):
                for name, op in choice.candidates.items():
                    if name != choice.chosen or index > stage.depth:
                        unused += list(op.parameters())
        return unused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prep(x)
        for stage in self.stages.values():
            x = stage(x)
        return self.head(x)


def build_standalone(space: ArchSpace, arch: Mapping[str, str], channels: Mapping[str, int], num_classes: int,
                     logits_weight: float = 0.125) -> Supernet:
    """A network with only the chosen ops of `arch` (its parameter names match the supernet's)."""
    return Supernet(space.fix(arch, channels), channels, num_classes, logits_weight)
