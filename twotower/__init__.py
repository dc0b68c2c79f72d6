"""twotower: two-tower block-diffusion language models on the Nemotron-H hybrid backbone."""

import logging

from twotower.cache import HybridCache
from twotower.checkpoint import CheckpointError
from twotower.config import NemotronHConfig
from twotower.generation import GenerationOutput, GenerationStats, TokenChunk
from twotower.model import NemotronHForCausalLM, NemotronHModel
from twotower.two_tower import TwoTowerForCausalLM

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "GenerationOutput",
    "GenerationStats",
    "HybridCache",
    "NemotronHConfig",
    "NemotronHForCausalLM",
    "NemotronHModel",
    "TokenChunk",
    "TwoTowerForCausalLM",
]
