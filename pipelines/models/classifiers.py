"""Per-region binary classifiers on region features (RGRG's region selector and abnormality classifier)."""

from __future__ import annotations

from torch import Tensor, nn


class RegionMLP(nn.Module):
    """``D -> 512 -> 128 -> 1`` (RGRG's sizes; hidden widths from ``ModelConfig.mlp_hidden``).

    ``forward(features[..., D]) -> logits[...]``. Used twice: the selector decides which regions get a
    sentence, the abnormality classifier scores each region. The layers live in ``classifier`` as an
    ``nn.Sequential`` so that RGRG's ``classifier.{0,2,4}`` state-dict keys load unchanged.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (512, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.classifier = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(features).squeeze(-1)
