"""Training of two-tower models: the stage-2 denoiser objective and the training loop."""

from twotower.training.objective import (
    context_features,
    denoiser_training_logits,
    diffusion_loss,
    masked_cross_entropy,
    mock_ar_loss,
    sample_noise,
)
from twotower.training.schedule import WarmupStableDecay
from twotower.training.trainer import TrainConfig, train

__all__ = [
    "context_features",
    "denoiser_training_logits",
    "diffusion_loss",
    "masked_cross_entropy",
    "mock_ar_loss",
    "sample_noise",
    "TrainConfig",
    "train",
    "WarmupStableDecay",
]
