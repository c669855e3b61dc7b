"""The multi-exit network: a backbone cut into sections, one exit head after each.

The seams the rest of the toolkit uses (see DESIGN.md):
- `exits`: plain records per exit (index 1..K, channels, stride, params, FLOPs);
- `forward(x)`: every exit's logits and pooled features;
- `truncate(k)`: a standalone module with sections 1..k and exit k's head only;
- `segments()`: K modules that chain section by section without recomputing a prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from byot_edge.errors import ByotError
from byot_edge.models.branches import BYOTBranch


@dataclass(frozen=True)
class Section:
    """One section of a backbone: where an exit may sit."""

    name: str
    module: nn.Module
    channels: int
    stride: int  # total stride from the input to this section's output


@dataclass
class Backbone:
    """A backbone cut for exits: what every builder returns, hand-cut or from a library.

    `make_head` makes the deepest exit's head, mapping the last section's output to (logits,
    pooled feature); it is called after the branches are made, so that a seed gives the
    weights it gave before heads came from builders. `source` is the state dict
    (`keep_vars=True`: the tensors themselves; not kept) of the plain model the modules were
    taken from: its keys are found for ours by tensor identity, so a state dict saved from
    that model loads into this one (`models.pretrained`). Builders whose modules come from
    no such model give `rename` instead: our key -> the plain model's key (None: none).
    `classifier` lists the plain model's keys that are never loaded (its classifier: the
    class count is this run's).
    """

    stem: nn.Module
    sections: list[Section]
    make_head: Callable[[], nn.Module]
    source: Mapping[str, torch.Tensor] | None = None
    rename: Callable[[str], str | None] | None = None
    classifier: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ExitInfo:
    """What a user sees about one exit. FLOPs count one image at the model's input size."""

    index: int
    stage: str
    channels: int
    stride: int
    params: int
    flops: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored in checkpoints and manifests."""

    arch: str
    num_classes: int
    in_chans: int = 3
    input_size: int = 32
    stem: str = "cifar"  # "cifar": 3x3 stride-1 stem; "imagenet": the stride-4 stem
    width: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


class ExitOutputs(NamedTuple):
    logits: list[torch.Tensor]
    features: list[torch.Tensor]


class TruncatedNet(nn.Module):
    """Stem, sections 1..k and exit k's head: what `export --exit k` writes."""

    def __init__(self, stem: nn.Module, sections: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.sections = nn.Sequential(*sections)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.sections(self.stem(x)))[0]


class Segment(nn.Module):
    """Section k (with the stem for k=1) and exit k: maps section k-1's output to
    (section k's output, exit k's logits); the last segment returns the logits only."""

    def __init__(self, prefix: nn.Module, section: nn.Module, head: nn.Module, last: bool) -> None:
        super().__init__()
        self.prefix = prefix
        self.section = section
        self.head = head
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.section(self.prefix(x))
        logits = self.head(h)[0]
        return logits if self.last else (h, logits)


class MultiExitNet(nn.Module):
    def __init__(self, config: ModelConfig, backbone: Backbone) -> None:
        super().__init__()
        sections = backbone.sections
        if len(sections) < 2:
            raise ValueError("a multi-exit network needs at least two sections")
        self.config = config
        self.stem = backbone.stem
        self.sections = nn.ModuleList(s.module for s in sections)
        deep = sections[-1]
        heads: list[nn.Module] = [
            BYOTBranch(s.channels, s.stride, deep.channels, deep.stride, config.num_classes)
            for s in sections[:-1]
        ]
        self.heads = nn.ModuleList([*heads, backbone.make_head()])
        self._section_meta = [(s.name, s.channels, s.stride) for s in sections]
        self._exits: list[ExitInfo] | None = None
        # Plain attributes, not state: which of our keys a plain backbone's state dict fills.
        self.source_keys = _source_keys(self, backbone)
        self.classifier_keys = backbone.classifier

    @property
    def num_exits(self) -> int:
        return len(self.sections)

    def forward(self, x: torch.Tensor) -> ExitOutputs:
        h = self.stem(x)
        logits, features = [], []
        for section, head in zip(self.sections, self.heads, strict=True):
            h = section(h)
            z, f = head(h)
            logits.append(z)
            features.append(f)
        return ExitOutputs(logits, features)

    def check_exit(self, k: int) -> int:
        if not 1 <= k <= self.num_exits:
            raise ByotError(
                f"exit {k} does not exist: this {self.config.arch} has exits "
                f"1..{self.num_exits} (exit {self.num_exits} is the deepest)"
            )
        return k

    def truncate(self, k: int) -> TruncatedNet:
        """Sections 1..k and exit k's head; shares parameters with this model."""
        self.check_exit(k)
        return TruncatedNet(self.stem, list(self.sections[:k]), self.heads[k - 1])

    def segments(self) -> list[Segment]:
        """K modules; chained, segment k's first output feeds segment k+1."""
        return [self.span(k, k) for k in range(1, self.num_exits + 1)]

    def span(self, first: int, last: int) -> Segment:
        """Segments first..last as one module, without the branches of exits first..last-1:
        section first-1's output (the image for first = 1) -> section last's output and exit
        last's logits (the logits only when last is the deepest exit)."""
        k_max = self.num_exits
        if not 1 <= first <= last <= k_max:
            raise ValueError(f"span {first}..{last} is not within exits 1..{k_max}")
        before = [self.stem] if first == 1 else []
        before += [self.sections[k - 1] for k in range(first, last)]
        prefix = nn.Identity() if not before else before[0] if len(before) == 1 else (
            nn.Sequential(*before))
        return Segment(prefix, self.sections[last - 1], self.heads[last - 1], last=last == k_max)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        c, s = self.config.in_chans, self.config.input_size
        return torch.zeros(batch, c, s, s)

    @property
    def exits(self) -> list[ExitInfo]:
        """Per-exit metadata; FLOPs are counted once by torch's FlopCounterMode."""
        if self._exits is None:
            self._exits = [self._exit_info(k) for k in range(1, self.num_exits + 1)]
        return self._exits

    def _exit_info(self, k: int) -> ExitInfo:
        from torch.utils.flop_counter import FlopCounterMode

        path = self.truncate(k)
        params = sum(p.numel() for p in path.parameters())
        was_training = self.training
        self.eval()
        try:
            p = next(self.parameters())
            x = self.example_input().to(device=p.device, dtype=p.dtype)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                path(x)
        finally:
            self.train(was_training)
        name, channels, stride = self._section_meta[k - 1]
        return ExitInfo(k, name, channels, stride, params, int(counter.get_total_flops()))


def _source_keys(net: nn.Module, backbone: Backbone) -> dict[str, str]:
    """Our state-dict key -> the plain backbone's, for the keys that have one (the
    branches and the classifier have none)."""
    ours = net.state_dict(keep_vars=True)
    if backbone.source is not None:
        theirs = {id(t): k for k, t in backbone.source.items()}
        keys = {k: theirs[id(t)] for k, t in ours.items() if id(t) in theirs}
    elif backbone.rename is not None:
        keys = {k: n for k in ours if (n := backbone.rename(k)) is not None}
    else:
        keys = {}
    return {k: n for k, n in keys.items() if n not in backbone.classifier}
