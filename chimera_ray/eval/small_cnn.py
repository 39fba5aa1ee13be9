"""The small from-scratch CNN of the evaluation: the downstream classifier's ``small_cnn``
backbone (`chimera_ray.eval.downstream.classifier`), the base-model probe's classifier
(`chimera_ray.eval.probes.base_model`, also the ``builtin:toy-features`` network) and both
FineMarks oracle networks (`chimera_ray.eval.probes.finemarks_oracle`). It sits below all three
so that neither the probes nor the downstream classifier import each other for it.
"""

from __future__ import annotations

import torch

__all__ = ["SmallCNN"]


class SmallCNN(torch.nn.Module):
    """Three conv-BN-ReLU-pool stages, global pooling and a linear head: a from-scratch classifier for 32-64 px."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        c_in = 3
        for c in (width, 2 * width, 4 * width):
            layers += [torch.nn.Conv2d(c_in, c, 3, padding=1), torch.nn.BatchNorm2d(c), torch.nn.ReLU(),
                       torch.nn.MaxPool2d(2)]
            c_in = c
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(batch, 3, S, S)`` in [-1, 1] -> logits ``(batch, num_classes)``."""
        return self.head(self.features(x).mean(dim=(2, 3)))
