"""The two-tower block-diffusion model: a frozen causal context tower and a time-conditioned denoiser.

The context tower (with ``context_lm_head``) reads the prompt and every committed token and owns
the cache. The denoiser tower (with ``lm_head``) fills a block of S tokens in one pass:

* attention layer i attends, bidirectionally, over ``[context K/V of layer i | block K/V]``;
* Mamba layer i scans the block causally, seeded read-only from the context's layer-i conv and
  SSM state (the scan runs in fp32);
* MoE and MLP layers act per token; the logit at block position j predicts the token at j.

With a timestep, each denoiser layer is modulated (adaLN-single): Mamba and attention layers
modulate then normalise, ``RMSNorm(x * (1 + scale) + shift)``; MoE and MLP layers normalise then
modulate, ``RMSNorm(x) * (1 + scale) + shift``; the residual adds ``gate * mixer(h)``. This order
matches where Megatron-LM fuses the norm in the released training code. Without a timestep
(mock-AR) the layers are plain pre-norm layers.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twotower.cache import HybridCache
from twotower.checkpoint import checkpoint_dtype, list_shards, load_weights, parse_dtype, read_config, save_state_dict
from twotower.config import ATTENTION, MAMBA, NemotronHConfig
from twotower.layers.mamba2 import MambaState
from twotower.model import NemotronHBlock, NemotronHForCausalLM, NemotronHModel
from twotower.time_conditioning import (
    TimestepEmbedder,
    layer_modulation,
    make_scale_shift_tables,
    make_t_block,
    reset_time_conditioning,
    time_embedding,
)

logger = logging.getLogger(__name__)

MixerFn = Callable[[torch.Tensor], torch.Tensor]


class ContextLM(nn.Module):
    """The context tower and ``context_lm_head`` seen as a plain causal LM (for AR generation)."""

    def __init__(self, two_tower: "TwoTowerForCausalLM"):
        super().__init__()
        self._owner = [two_tower]  # a list, so the owner is not registered as a submodule

    @property
    def config(self) -> NemotronHConfig:
        return self._owner[0].config

    @property
    def device(self) -> torch.device:
        return self._owner[0].context_device

    @property
    def dtype(self) -> torch.dtype:
        return self._owner[0].context_lm_head.weight.dtype

    def new_cache(self, batch_size: int, capacity: int = 256, track_previous: bool = False) -> HybridCache:
        return HybridCache(self.config, batch_size, self.dtype, self.device, capacity, track_previous)

    def forward(self, input_ids, cache=None, attention_mask=None, logits_to_keep=0, **kwargs):
        owner = self._owner[0]
        hidden = owner.context_tower(input_ids, cache=cache, attention_mask=attention_mask, **kwargs)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return owner.context_lm_head(hidden).float()


class TwoTowerForCausalLM(nn.Module):
    def __init__(self, config: NemotronHConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.context_tower = NemotronHModel(config)
        self.context_lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.denoiser_tower = NemotronHModel(config)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.t_embedder = TimestepEmbedder(hidden)
        self.t_block = make_t_block(hidden)
        self.scale_shift_tables = make_scale_shift_tables(hidden, config.num_hidden_layers)
        self.context_lm = ContextLM(self)

    # ------------------------------------------------------------------ placement

    @property
    def context_device(self) -> torch.device:
        return self.context_lm_head.weight.device

    @property
    def denoiser_device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def device(self) -> torch.device:
        return self.context_device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def place_towers_on_devices(self, ctx_device: str | torch.device, den_device: str | torch.device) -> "TwoTowerForCausalLM":
        """Put the context tower and its head on ``ctx_device``; the denoiser, its head and the time
        conditioning on ``den_device``. Only caches and token blocks cross between them."""
        self.context_tower.to(ctx_device)
        self.context_lm_head.to(ctx_device)
        for module in (self.denoiser_tower, self.lm_head, self.t_embedder, self.t_block, self.scale_shift_tables):
            module.to(den_device)
        return self

    # ------------------------------------------------------------------ context tower

    def new_cache(self, batch_size: int, capacity: int = 256, track_previous: bool = False) -> HybridCache:
        return self.context_lm.new_cache(batch_size, capacity, track_previous)

    def extend_context(self, token_ids: torch.Tensor, cache: HybridCache, attention_mask: torch.Tensor | None = None) -> None:
        """Append ``token_ids`` (B, L) to the context: one causal pass, K/V appended, Mamba states
        advanced with a chunk scan seeded from the current state."""
        self.context_tower(token_ids.to(self.context_device), cache=cache, attention_mask=attention_mask)

    # ------------------------------------------------------------------ denoiser tower

    def denoiser_layer(
        self, layer: NemotronHBlock, x: torch.Tensor, embedding: torch.Tensor | None, mixer: MixerFn
    ) -> torch.Tensor:
        """One denoiser layer around ``mixer``: time-modulated when ``embedding`` (B, 3, H) is given."""
        if embedding is None:
            return x + mixer(layer.norm(x))
        shift, scale, gate = layer_modulation(self.scale_shift_tables, embedding, layer.layer_idx)
        if layer.block_type in (MAMBA, ATTENTION):
            h = layer.norm(x * (1 + scale) + shift)
        else:
            h = layer.norm(x) * (1 + scale) + shift
        return x + gate * mixer(h)

    def time_embedding(self, t: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if t is None:
            return None
        t = torch.as_tensor(t, dtype=torch.float32, device=self.denoiser_device)
        if t.dim() == 0:
            t = t.expand(batch)
        return time_embedding(self.t_embedder, self.t_block, t)

    def denoise(
        self,
        block_ids: torch.Tensor,
        context: HybridCache,
        t: torch.Tensor | float | None,
        context_length: int | None = None,
        mamba_states: dict[int, MambaState] | None = None,
    ) -> torch.Tensor:
        """Run the denoiser over ``block_ids`` (B, S) against ``context``; return fp32 logits (B, S, V).

        ``t`` (B,) is each row's masked fraction, or ``None`` for no time conditioning (mock-AR).
        ``context_length`` limits the context K/V used (default: all of it) and ``mamba_states``
        replaces the context's current Mamba states (mock-AR reads the states one token back).
        The context cache is only read.
        """
        batch, block = block_ids.shape
        device = self.denoiser_device
        length = context.length if context_length is None else context_length
        states = context.mamba if mamba_states is None else mamba_states
        key_mask = context.key_mask[:, :length].to(device)
        if bool(key_mask.all()):
            attn_mask = None
        else:
            full = torch.cat([key_mask, key_mask.new_ones(batch, block)], dim=1)
            attn_mask = full[:, None, None, :]  # every block position sees the same keys

        embedding = self.time_embedding(t, batch)
        x = self.denoiser_tower.embeddings(block_ids.to(device))
        for i, layer in enumerate(self.denoiser_tower.layers):
            if layer.block_type == MAMBA:
                seed = MambaState(states[i].conv.to(device), states[i].ssm.to(device))
                mixer = lambda h, layer=layer, seed=seed: layer.mixer(h, seed).hidden  # noqa: E731
            elif layer.block_type == ATTENTION:
                ctx_k = context.keys[i][:, :, :length].to(device)
                ctx_v = context.values[i][:, :, :length].to(device)
                mixer = lambda h, layer=layer, ctx_k=ctx_k, ctx_v=ctx_v: _attend_over_context(  # noqa: E731
                    layer, h, ctx_k, ctx_v, attn_mask
                )
            else:
                mixer = layer.mixer
            x = self.denoiser_layer(layer, x, embedding, mixer)
        return self.lm_head(self.denoiser_tower.norm_f(x)).float()

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids: torch.Tensor, **kwargs: Any):
        """Plain AR with the context tower and ``context_lm_head`` (see ``generate_ar``)."""
        from twotower.generation import generate_ar

        return generate_ar(self.context_lm, input_ids, **kwargs)

    def generate_mask_diffusion(self, input_ids: torch.Tensor, **kwargs: Any):
        """Block-wise mask diffusion (see ``twotower.diffusion.generate_mask_diffusion``)."""
        from twotower.diffusion import generate_mask_diffusion

        return generate_mask_diffusion(self, input_ids, **kwargs)

    def stream_mask_diffusion(self, input_ids: torch.Tensor, **kwargs: Any):
        from twotower.diffusion import stream_mask_diffusion

        return stream_mask_diffusion(self, input_ids, **kwargs)

    def generate_mock_ar(self, input_ids: torch.Tensor, **kwargs: Any):
        """Two-tower AR, one token a step (see ``twotower.diffusion.generate_mock_ar``)."""
        from twotower.diffusion import generate_mock_ar

        return generate_mock_ar(self, input_ids, **kwargs)

    def stream_mock_ar(self, input_ids: torch.Tensor, **kwargs: Any):
        from twotower.diffusion import stream_mock_ar

        return stream_mock_ar(self, input_ids, **kwargs)

    # ------------------------------------------------------------------ construction and I/O

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random weights for both towers and the time conditioning (for tests and benchmarks)."""
        self.context_tower.init_weights(generator)
        self.denoiser_tower.init_weights(generator)
        for head in (self.context_lm_head, self.lm_head):
            head.weight.normal_(0.0, self.config.initializer_range, generator=generator)
        self.reset_time_conditioning(generator)

    def reset_time_conditioning(self, generator: torch.Generator | None = None) -> None:
        reset_time_conditioning(self.t_embedder, self.t_block, self.scale_shift_tables, generator)

    @classmethod
    def from_config(cls, config: NemotronHConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> "TwoTowerForCausalLM":
        model = cls(config)
        model.init_weights(torch.Generator().manual_seed(seed))
        return model.to(dtype)

    @classmethod
    def from_single_tower(
        cls,
        path_or_model: str | Path | NemotronHForCausalLM,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> "TwoTowerForCausalLM":
        """Copy one Nemotron-H checkpoint into both towers (and both heads) and initialise fresh time
        conditioning: the starting point of denoiser training."""
        if isinstance(path_or_model, NemotronHForCausalLM):
            single = path_or_model
        else:
            single = NemotronHForCausalLM.from_pretrained(path_or_model, dtype=dtype, device=device)
        model = cls(single.config)
        model.context_tower = single.backbone
        model.context_lm_head = single.lm_head
        model.denoiser_tower = copy.deepcopy(single.backbone)
        model.lm_head = copy.deepcopy(single.lm_head)
        model.reset_time_conditioning(torch.Generator().manual_seed(seed))
        target_dtype = parse_dtype(dtype) or single.dtype
        for module in (model.t_embedder, model.t_block, model.scale_shift_tables):
            module.to(device=single.device, dtype=target_dtype)
        return model.eval()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
    ) -> "TwoTowerForCausalLM":
        """Load a two-tower checkpoint in the released layout (sharded safetensors, one tensor per expert)."""
        config = read_config(path)
        shards = list_shards(path)
        if not any(name.startswith("denoiser_tower.") for name in shards):
            from twotower.checkpoint import CheckpointError

            raise CheckpointError(
                f"{path} holds no denoiser_tower.* tensors: it is not a two-tower checkpoint; "
                "use TwoTowerForCausalLM.from_single_tower to start one from a single-tower model"
            )
        dtype = parse_dtype(dtype) or checkpoint_dtype(path)
        with torch.device("meta"):
            model = cls(config)
        load_weights(model, path, dtype=dtype, device=device)
        logger.info("loaded two-tower model from %s (%s, %s)", path, dtype, device)
        return model.eval()

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "2GB", remote_code: bool = True) -> None:
        """Write the released layout; with ``remote_code`` also the files that let
        ``transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` load it."""
        path = Path(path)
        extra: dict[str, Any] = {"architectures": ["TwoTowerForCausalLM"], "two_tower": True}
        if remote_code:
            from twotower.hf_remote import install_remote_code

            extra.update(install_remote_code(path))
        self.config.save(path, extra=extra)
        save_state_dict(self.state_dict(), path, max_shard_size=max_shard_size)


def _attend_over_context(layer: NemotronHBlock, h, ctx_k, ctx_v, attn_mask) -> torch.Tensor:
    """Bidirectional attention of the block over [context K/V | block K/V] (no causal mask)."""
    q, k, v = layer.mixer.project(h)
    return layer.mixer.attend(q, torch.cat([ctx_k, k], dim=2), torch.cat([ctx_v, v], dim=2), attn_mask)
