"""One Nemotron-H tower: embeddings, hybrid layers, ``norm_f`` and (for the causal LM) the head.

Every layer is ``x = x + mixer(RMSNorm(x))``. The parameter names match the checkpoints that
transformers and NVIDIA publish (``backbone.layers.{i}.mixer...``), so state dicts load unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twotower.cache import HybridCache
from twotower.config import ATTENTION, MAMBA, MLP, MOE, NemotronHConfig
from twotower.layers import Attention, Mamba2Mixer, MoE, ReLU2MLP, RMSNorm


class NemotronHBlock(nn.Module):
    def __init__(self, config: NemotronHConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.block_type = config.hybrid_override_pattern[layer_idx]
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        if self.block_type == MAMBA:
            self.mixer = Mamba2Mixer(config)
        elif self.block_type == ATTENTION:
            self.mixer = Attention(config)
        elif self.block_type == MOE:
            self.mixer = MoE(config)
        elif self.block_type == MLP:
            self.mixer = ReLU2MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        else:  # the config validates the pattern, so this is an internal error
            raise AssertionError(f"unknown layer type {self.block_type!r}")


def causal_attention_mask(
    key_mask: torch.Tensor, start: int, length: int, self_attend_padding: bool = True
) -> torch.Tensor:
    """Boolean mask (B, 1, L, start + L): query i attends to keys ``j <= start + i`` that are real tokens.

    Padded queries would see no key at all (SDPA then returns NaN), so they attend to themselves;
    their outputs are never read.
    """
    total = start + length
    device = key_mask.device
    query_pos = torch.arange(start, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    mask = (key_pos <= query_pos)[None] & key_mask[:, None, :total]
    if self_attend_padding:
        mask = mask | (key_pos == query_pos)[None]
    return mask[:, None]


class NemotronHModel(nn.Module):
    """Embeddings, layers and ``norm_f``: returns final hidden states."""

    def __init__(self, config: NemotronHConfig):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(NemotronHBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
        chunk_size: int | None = None,
        scan: str = "chunked",
        moe_dispatch: str = "grouped",
    ) -> torch.Tensor:
        """Run the tower over ``input_ids`` (B, L); return hidden states (B, L, H) after ``norm_f``.

        With a ``cache`` the tokens continue from ``cache.length`` (prefill, a chunk, or one decoded
        token) and the cache advances. ``attention_mask`` (B, L) marks real tokens with 1 and left
        padding with 0; padding neither advances a Mamba state nor receives attention.
        """
        batch, length = input_ids.shape
        if attention_mask is not None:
            real = attention_mask.to(dtype=torch.bool, device=input_ids.device)
            pad_mask = None if bool(real.all()) else real
        else:
            real = torch.ones(batch, length, dtype=torch.bool, device=input_ids.device)
            pad_mask = None

        if cache is not None:
            if cache.batch_size != batch:
                raise ValueError(f"input batch size {batch} does not match the cache batch size {cache.batch_size}")
            start = cache.length
            cache.reserve(length)
            cache.key_mask[:, start : start + length] = real
            key_mask = cache.key_mask
        else:
            start = 0
            key_mask = real

        # A single decoded token over an unpadded cache needs no mask, which lets SDPA take its fast path.
        if length == 1 and bool(key_mask[:, : start + 1].all()):
            attn_mask = None
        else:
            attn_mask = causal_attention_mask(key_mask, start, length)

        x = self.embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer.norm(x)
            if layer.block_type == MAMBA:
                state = cache.mamba[i] if cache is not None else None
                track = cache is not None and cache.track_previous
                out = layer.mixer(h, state, pad_mask=pad_mask, chunk_size=chunk_size, return_previous=track, scan=scan)
                if cache is not None:
                    cache.mamba[i] = out.state
                    if track:
                        cache.mamba_previous[i] = out.previous
                h = out.hidden
            elif layer.block_type == ATTENTION:
                q, k, v = layer.mixer.project(h)
                if cache is not None:
                    k, v = cache.write_kv(i, start, k, v)
                h = layer.mixer.attend(q, k, v, attn_mask)
            elif layer.block_type == MOE:
                h = layer.mixer(h, dispatch=moe_dispatch)
            else:
                h = layer.mixer(h)
            x = x + h

        if cache is not None:
            cache.length = start + length
        return self.norm_f(x)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random initialisation: N(0, 0.02) projections, residual outputs scaled by 1/sqrt(2 * layers)."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_output = name.endswith(("out_proj", "o_proj", "down_proj"))
                module.weight.normal_(0.0, out_std if is_output else std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Conv1d):
                bound = 1.0 / math.sqrt(module.kernel_size[0])
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, (RMSNorm,)) or type(module).__name__ == "GatedRMSNorm":
                module.weight.fill_(1.0)
            if isinstance(module, Mamba2Mixer):
                module.reset_ssm_parameters(generator)
            if type(module).__name__ == "TopKRouter":
                module.weight.normal_(0.0, std, generator=generator)
                module.e_score_correction_bias.zero_()


class NemotronHForCausalLM(nn.Module):
    """A Nemotron-H tower with its untied ``lm_head``; plain cached autoregressive generation."""

    def __init__(self, config: NemotronHConfig):
        super().__init__()
        self.config = config
        self.backbone = NemotronHModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Return fp32 logits (B, L, V), or of the last ``logits_to_keep`` positions when it is > 0."""
        hidden = self.backbone(input_ids, cache=cache, attention_mask=attention_mask, **kwargs)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden).float()

    def new_cache(self, batch_size: int, capacity: int = 256, track_previous: bool = False) -> HybridCache:
        return HybridCache(
            self.config, batch_size, dtype=self.dtype, device=self.device, capacity=capacity,
            track_previous=track_previous,
        )

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        self.backbone.init_weights(generator)
        self.lm_head.weight.normal_(0.0, self.config.initializer_range, generator=generator)

    @classmethod
    def from_config(cls, config: NemotronHConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> "NemotronHForCausalLM":
        """Build a randomly initialised model (deterministic for a given ``seed``)."""
        model = cls(config)
        model.init_weights(torch.Generator().manual_seed(seed))
        return model.to(dtype)

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Cached autoregressive generation in the Hugging Face style; see ``twotower.generation.generate_ar``."""
        from twotower.generation import generate_ar

        return generate_ar(self, input_ids, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
    ) -> "NemotronHForCausalLM":
        """Load a single-tower checkpoint, or the context tower of a two-tower one."""
        from twotower.checkpoint import load_causal_lm

        return load_causal_lm(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "2GB") -> None:
        from twotower.checkpoint import save_state_dict

        self.config.save(path)
        save_state_dict(self.state_dict(), path, max_shard_size=max_shard_size)
