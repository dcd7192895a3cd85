"""Modules of one or two Linears: what the fuzz, bad-input and serving tests adapt."""

import torch
from torch import nn


class OneLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class TwoLinears(nn.Module):
    """x: [..., 12] -> [..., 8] through a hidden width of 16."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))
