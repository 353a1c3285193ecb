"""Local training and local evaluation, run at a site on its own processed data (imports torch)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from quorum.configs.errors import ConfigError
from quorum.evaluation.metrics import BinaryCounts, counts_from_scores
from quorum.evaluation.report import SiteEvaluation
from quorum.tasks.model import build_model, get_weights, set_weights
from quorum.tasks.weights import Weights


@dataclass(frozen=True)
class LocalTrainingConfig:
    hidden_sizes: tuple[int, ...]
    dropout: float
    local_epochs: int
    batch_size: int
    learning_rate: float
    balanced: bool
    seed: int
    proximal_mu: float = 0.0  # FedProx: > 0 pulls local training back towards the global weights
    freeze_layers: int = 0  # fine-tuning: the first N Linear layers keep their incoming weights and biases

    def __post_init__(self) -> None:
        if not self.proximal_mu >= 0:
            raise ConfigError(f"proximal_mu {self.proximal_mu} must be >= 0", fix="use 0 (off) or e.g. 0.01 to 1")
        if not 0 <= self.freeze_layers <= len(self.hidden_sizes):
            raise ConfigError(
                f"freeze_layers {self.freeze_layers} is outside 0..{len(self.hidden_sizes)}",
                fix="freeze fewer layers than the model has Linear layers, so something is left to train",
            )


@dataclass(frozen=True)
class TrainResult:
    weights: Weights
    num_examples: int
    train_loss: float


def train_local(
    weights: Sequence[NDArray[np.float32]],
    features: NDArray[np.float32],
    labels: NDArray[np.float32],
    config: LocalTrainingConfig,
) -> TrainResult:
    """Start from the global weights, run SGD over the site's training split, return the new weights.

    ``train_loss`` is the data loss alone, without the proximal term, so runs with and without FedProx
    report comparable losses.
    """
    # Model init and dropout draw from the CPU generator, the only one a site trains with; seeding it alone
    # spares ``torch.manual_seed``'s seeding of every accelerator backend (a stack capture each, every call).
    torch.default_generator.manual_seed(config.seed)
    model = build_model(features.shape[1], config.hidden_sizes, config.dropout)
    set_weights(model, weights)
    trainable = freeze_leading_layers(model, config.freeze_layers)
    x = torch.from_numpy(_writable(features))
    y = torch.from_numpy(_writable(labels))
    positives = float(y.sum())
    balance = config.balanced and positives > 0  # unweighted skips a per-batch multiply: same loss, ~4% faster
    pos_weight = torch.tensor((len(y) - positives) / positives) if balance else None
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    generator = torch.Generator().manual_seed(config.seed)
    anchors = [p.detach().clone() for p in trainable] if config.proximal_mu > 0 else []
    model.train()
    total_loss, batches = 0.0, 0
    for _ in range(config.local_epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            objective = loss + _proximal_term(trainable, anchors, config.proximal_mu) if anchors else loss
            objective.backward()
            sgd_step(trainable, config.learning_rate)
            total_loss += float(loss.detach())
            batches += 1
    return TrainResult(get_weights(model), len(x), total_loss / max(batches, 1))


def sgd_step(params: Sequence[torch.nn.Parameter], learning_rate: float) -> None:
    """One plain SGD step, ``w -= lr * grad``, then clear the gradients: what ``torch.optim.SGD(lr=...)``
    computes without momentum or weight decay, to the bit.

    Written out because ``torch.optim``'s optimizers are wrapped to keep ``torch.compile`` out, and the
    first call through that wrapper imports ``torch._dynamo``: 1.5-2 s of CPU in every site process, for
    an update that is one multiply-add per tensor.
    """
    with torch.no_grad():
        for param in params:
            if param.grad is not None:
                param.add_(param.grad, alpha=-learning_rate)
                param.grad = None


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads, then give the process back the count it had.

    Small models on small batches spend more time waking a thread pool than computing: on one thread they
    train faster, and stay fast when the machine is busy.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def freeze_leading_layers(model: torch.nn.Module, count: int) -> list[torch.nn.Parameter]:
    """Keep the first ``count`` Linear layers fixed (``requires_grad=False``); return the parameters left to train.

    Fine-tuning a seed model: the early layers hold features learnt elsewhere, so only the head adapts
    to the federation's data, which needs fewer rounds and less data than training everything.
    """
    linear = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    if not 0 <= count < len(linear):
        raise ConfigError(
            f"cannot freeze {count} of the model's {len(linear)} Linear layers", fix="leave at least one to train"
        )
    for module in linear[:count]:
        for param in module.parameters():
            param.requires_grad_(False)
    return [param for param in model.parameters() if param.requires_grad]


def _writable(values: NDArray[np.float32]) -> NDArray[np.float32]:
    """A C-contiguous float32 array torch may wrap: cached site matrices are read-only, so those are copied."""
    return np.require(values, dtype=np.float32, requirements=["C", "W"])


def _proximal_term(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx (Li et al. 2020): ``mu / 2 * ||w - w_global||^2`` limits client drift on non-IID sites.

    Over trained parameters only: the scaling buffers and frozen layers never move, so never drift.
    """
    squared = torch.zeros(())
    for param, anchor in zip(params, anchors, strict=True):
        squared = squared + ((param - anchor) ** 2).sum()
    return squared * (mu / 2.0)


def predict_scores(
    weights: Sequence[NDArray[np.float32]],
    features: NDArray[np.float32],
    hidden_sizes: Sequence[int],
) -> NDArray[np.float64]:
    """Probabilities of the positive class."""
    model = build_model(features.shape[1], hidden_sizes)
    set_weights(model, weights)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(_writable(features)))
    return torch.sigmoid(logits).double().numpy()


def evaluate_local(
    site_id: str,
    scores: NDArray[np.float64],
    labels: NDArray[np.float32],
    groups: NDArray[np.str_] | None,
    threshold: float = 0.5,
) -> SiteEvaluation:
    """Reduce a site's predictions to the counts it may share, overall and per protected group."""
    overall = counts_from_scores(labels, scores, threshold)
    per_group: Mapping[str, BinaryCounts] = {}
    if groups is not None:
        per_group = {
            str(name): counts_from_scores(labels[groups == name], scores[groups == name], threshold)
            for name in np.unique(groups)
        }
    return SiteEvaluation(site_id=site_id, overall=overall, groups=per_group)
