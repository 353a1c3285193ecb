"""The global model: a small torch MLP whose input scaling is part of its weights.

Feature means and standard deviations come from the sites' aggregated sums (never rows) and are
stored as buffers, so every site feeds raw processed features and the scaling travels with the model.
This module imports torch; import it lazily from anything that must start fast.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from quorum.tasks.weights import Weights


class ScaledMLP(nn.Module):
    """``features -> hidden... -> 1 logit`` with fixed input-scaling buffers."""

    def __init__(self, num_features: int, hidden_sizes: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))
        layers: list[nn.Module] = []
        width = num_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = (x - self.get_buffer("feature_mean")) / self.get_buffer("feature_std")
        return self.net(scaled).squeeze(-1)  # type: ignore[no-any-return]


def build_model(num_features: int, hidden_sizes: Sequence[int], dropout: float = 0.0) -> ScaledMLP:
    return ScaledMLP(num_features, hidden_sizes, dropout)


def get_weights(model: nn.Module) -> Weights:
    """Every tensor of the state dict, buffers included, in a fixed order."""
    return [t.detach().cpu().numpy().astype(np.float32, copy=True) for t in model.state_dict().values()]


def set_weights(model: nn.Module, weights: Sequence[NDArray[np.float32]]) -> None:
    keys = list(model.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"model has {len(keys)} tensors, got {len(weights)}")
    state = {key: torch.from_numpy(np.array(w, dtype=np.float32)) for key, w in zip(keys, weights, strict=True)}
    model.load_state_dict(state, strict=True)


def model_from_weights(weights: Sequence[NDArray[np.float32]], hidden_sizes: Sequence[int]) -> ScaledMLP:
    model = build_model(weights[0].shape[0], hidden_sizes)
    set_weights(model, weights)
    model.eval()
    return model


def initial_weights(
    num_features: int,
    hidden_sizes: Sequence[int],
    feature_mean: NDArray[np.float64],
    feature_std: NDArray[np.float64],
    seed: int,
) -> Weights:
    """Seeded initial weights with the federation's feature scaling filled in."""
    torch.manual_seed(seed)
    model = build_model(num_features, hidden_sizes)
    with torch.no_grad():
        model.get_buffer("feature_mean").copy_(torch.from_numpy(np.asarray(feature_mean, dtype=np.float32)))
        model.get_buffer("feature_std").copy_(
            torch.from_numpy(np.maximum(np.asarray(feature_std, dtype=np.float32), 1e-6))
        )
    return get_weights(model)
