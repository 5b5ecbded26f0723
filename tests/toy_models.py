"""Model factories for the import-path tests (train.model: toy_models:<factory>)."""

from torch import nn


def tiny_cnn(input_shape, n_classes, width=8):
    """A small CNN with BatchNorm: its running statistics are float buffers of every P_k."""
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, n_classes),
    )


def not_a_module(input_shape, n_classes):
    return "a string"


def cumulative_batchnorm(input_shape, n_classes):
    return nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64, momentum=None), nn.Linear(64, n_classes))


def flat_batchnorm(input_shape, n_classes):
    """BatchNorm1d over flat features: a batch of one sample has one value per channel."""
    n_in = 1
    for d in input_shape:
        n_in *= d
    return nn.Sequential(nn.Flatten(), nn.BatchNorm1d(n_in), nn.Linear(n_in, n_classes))
