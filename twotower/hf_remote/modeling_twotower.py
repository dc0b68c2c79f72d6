"""transformers model class of a two-tower Nemotron-H checkpoint, loaded with ``trust_remote_code=True``.

This file is copied next to the weights by ``twotower.hf_remote.install_remote_code``. The model
wraps ``twotower.TwoTowerForCausalLM`` from the installed ``twotower`` package in the
``PreTrainedModel`` interface. It registers the wrapped model's submodules under the checkpoint's own
names (``context_tower``, ``denoiser_tower``, ``lm_head`` and so on), so transformers' loader fills
every tensor without renaming. The generation methods call the twotower ones unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_twotower import TwoTowerNemotronHConfig

try:
    from twotower.config import NemotronHConfig
    from twotower.layers.mamba2 import Mamba2Mixer
    from twotower.layers.moe import TopKRouter
    from twotower.two_tower import TwoTowerForCausalLM
except ImportError as error:  # transformers skips imports inside try blocks when it checks requirements
    raise ImportError(
        "this checkpoint's model code runs on the twotower package, which failed to import "
        f"({error}); install it with `pip install twotower` and load the model again"
    ) from error

# Submodules of TwoTowerForCausalLM that own parameters. Their names are the checkpoint's prefixes.
_PARAMETER_MODULES = (
    "context_tower",
    "context_lm_head",
    "denoiser_tower",
    "lm_head",
    "t_embedder",
    "t_block",
    "scale_shift_tables",
)


def native_config(config: TwoTowerNemotronHConfig) -> NemotronHConfig:
    """Build the twotower config from the transformers one (the fields have the same names)."""
    names = [f.name for f in dataclasses.fields(NemotronHConfig) if f.name != "extra"]
    values = {name: getattr(config, name) for name in names if hasattr(config, name)}
    return NemotronHConfig.from_dict(values)


class TwoTowerNemotronHForCausalLM(PreTrainedModel):
    """A two-tower block-diffusion LM: the causal context tower and the time-conditioned denoiser.

    ``generate`` decodes autoregressively with the context tower and ``context_lm_head``.
    ``generate_mask_diffusion`` and ``generate_mock_ar`` use both towers. Each method takes the
    arguments of the ``TwoTowerForCausalLM`` method of the same name and returns the same tokens.
    """

    config_class = TwoTowerNemotronHConfig
    base_model_prefix = "model"  # no such attribute, so base_model is the model itself
    main_input_name = "input_ids"
    _no_split_modules = ["NemotronHBlock"]
    # The router's correction bias decides near-ties between experts, so twotower keeps it in fp32.
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]

    def __init__(self, config: TwoTowerNemotronHConfig):
        super().__init__(config)
        model = TwoTowerForCausalLM(native_config(config))
        # A list, so the twotower model is reachable without registering its modules a second time.
        self._two_tower = [model]
        for name in _PARAMETER_MODULES:
            setattr(self, name, getattr(model, name))
        self.post_init()

    @property
    def two_tower(self) -> TwoTowerForCausalLM:
        """The ``twotower.TwoTowerForCausalLM`` sharing this model's modules and weights."""
        return self._two_tower[0]

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info
        model._copy_cpu_tensors()
        return loaded

    @torch.no_grad()
    def _copy_cpu_tensors(self) -> None:
        # On the CPU, transformers leaves tensors as views into the memory-mapped safetensors file, at
        # offsets that are not 64-byte aligned. BLAS then takes other code paths and the logits differ
        # from TwoTowerForCausalLM.from_pretrained (which copies every tensor) in the last bits.
        for module in self.modules():
            for name, param in module._parameters.items():
                if param is not None and param.device.type == "cpu":
                    module._parameters[name] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type == "cpu":
                    module._buffers[name] = buffer.clone()

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise one module as ``TwoTowerForCausalLM.init_weights`` does; transformers calls
        it only for modules whose tensors the checkpoint did not provide."""
        std = self.config.initializer_range
        if module is self.scale_shift_tables:
            for table in module:
                table.copy_(torch.randn(table.shape) / table.shape[-1] ** 0.5)
        elif isinstance(module, Mamba2Mixer):
            module.reset_ssm_parameters()
        elif isinstance(module, TopKRouter):
            module.weight.normal_(0.0, std)
            module.e_score_correction_bias.zero_()
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Conv1d):
            bound = 1.0 / math.sqrt(module.kernel_size[0])
            module.weight.uniform_(-bound, bound)
            if module.bias is not None:
                module.bias.uniform_(-bound, bound)
        elif "RMSNorm" in type(module).__name__:
            module.weight.fill_(1.0)

    # ------------------------------------------------------------------ forward and generation

    def get_input_embeddings(self) -> nn.Embedding:
        return self.context_tower.embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.context_lm_head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> CausalLMOutput:
        """Return the context tower's fp32 next-token logits (B, L, V) for ``input_ids`` (B, L), uncached."""
        kwargs.pop("token_type_ids", None)
        kwargs.pop("use_cache", None)
        if kwargs:
            raise TypeError(f"forward() got unsupported arguments: {sorted(kwargs)}")
        mask = None if attention_mask is None or bool(attention_mask.bool().all()) else attention_mask
        logits = self.two_tower.context_lm(input_ids, attention_mask=mask)
        return CausalLMOutput(logits=logits)

    def generate(self, input_ids: torch.Tensor, **kwargs: Any):
        """Decode autoregressively with the context tower; arguments as ``twotower.generation.generate_ar``.

        Unlike transformers' ``generate``, generation stops at EOS only when ``eos_token_id`` is given.
        """
        kwargs.pop("token_type_ids", None)
        kwargs.pop("use_cache", None)
        return self.two_tower.generate(input_ids, **kwargs)

    def generate_mask_diffusion(self, input_ids: torch.Tensor, **kwargs: Any):
        """Generate with block-wise mask diffusion; arguments as ``TwoTowerForCausalLM.generate_mask_diffusion``."""
        kwargs.pop("token_type_ids", None)
        return self.two_tower.generate_mask_diffusion(input_ids, **kwargs)

    def stream_mask_diffusion(self, input_ids: torch.Tensor, **kwargs: Any):
        kwargs.pop("token_type_ids", None)
        return self.two_tower.stream_mask_diffusion(input_ids, **kwargs)

    def generate_mock_ar(self, input_ids: torch.Tensor, **kwargs: Any):
        """Generate one token a denoiser pass (two-tower AR); arguments as ``TwoTowerForCausalLM.generate_mock_ar``."""
        kwargs.pop("token_type_ids", None)
        return self.two_tower.generate_mock_ar(input_ids, **kwargs)

    def stream_mock_ar(self, input_ids: torch.Tensor, **kwargs: Any):
        kwargs.pop("token_type_ids", None)
        return self.two_tower.stream_mock_ar(input_ids, **kwargs)

    def place_towers_on_devices(
        self, ctx_device: str | torch.device, den_device: str | torch.device
    ) -> "TwoTowerNemotronHForCausalLM":
        """Put the context tower and its head on ``ctx_device``, the denoiser and the time conditioning on ``den_device``."""
        self.two_tower.place_towers_on_devices(ctx_device, den_device)
        return self

    @property
    def context_device(self) -> torch.device:
        return self.two_tower.context_device

    @property
    def denoiser_device(self) -> torch.device:
        return self.two_tower.denoiser_device

    def train(self, mode: bool = True) -> "TwoTowerNemotronHForCausalLM":
        super().train(mode)
        self.two_tower.train(mode)
        return self
