"""transformers configuration of a two-tower Nemotron-H checkpoint, loaded with ``trust_remote_code=True``.

This file is copied next to the weights by ``twotower.hf_remote.install_remote_code``. It imports
only transformers, so ``AutoConfig`` reads a checkpoint even where the ``twotower`` package is not
installed. The fields and defaults are those of ``twotower.config.NemotronHConfig``, which builds the
model; ``config.json`` written by ``TwoTowerForCausalLM.save_pretrained`` sets every one of them.
"""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

MODEL_TYPE = "twotower_nemotron_h"


class TwoTowerNemotronHConfig(PreTrainedConfig):
    """Hyperparameters shared by both towers. ``hybrid_override_pattern`` has one character a layer:
    ``M`` Mamba-2, ``*`` attention, ``E`` mixture of experts, ``-`` dense MLP."""

    # transformers turns every subclass into a dataclass, so these annotated attributes are its fields.
    model_type = MODEL_TYPE

    vocab_size: int = 131072
    hidden_size: int = 2688
    hybrid_override_pattern: str = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    num_hidden_layers: int | None = None
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False

    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    attention_bias: bool = False
    max_position_embeddings: int = 262144

    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False
    time_step_limit: tuple[float, float] | list[float] = (0.0, math.inf)
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    expand: int = 2

    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    moe_latent_size: int | None = None
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5

    intermediate_size: int = 1856
    mlp_bias: bool = False

    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    mask_token_id: int = 3

    def __post_init__(self, **kwargs):
        # The layer count follows from the pattern; a stale value in config.json is overwritten.
        self.num_hidden_layers = len(self.hybrid_override_pattern)
        super().__post_init__(**kwargs)
