"""The four mixers of a Nemotron-H layer and their norms.

Shape names used across the package: B batch, L sequence length, S block length, H hidden size,
nh heads, P head dim, N SSM state size, G groups, E experts, K top-k, V vocabulary.
"""

from twotower.layers.attention import Attention
from twotower.layers.mamba2 import Mamba2Mixer
from twotower.layers.mlp import ReLU2MLP
from twotower.layers.moe import MoE, TopKRouter
from twotower.layers.norms import GatedRMSNorm, RMSNorm

__all__ = ["Attention", "Mamba2Mixer", "ReLU2MLP", "MoE", "TopKRouter", "GatedRMSNorm", "RMSNorm"]
