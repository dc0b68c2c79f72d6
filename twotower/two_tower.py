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
import logging
from collections.abc import Callable
from dataclasses import dataclass
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
        """Apply one denoiser layer around ``mixer``, time-modulated when ``embedding`` (B, 3, H) is given."""
        h, gate = self.denoiser_norm(layer, x, embedding)
        return x + mixer(h) if gate is None else x + gate * mixer(h)

    def denoiser_norm(
        self, layer: NemotronHBlock, x: torch.Tensor, embedding: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return a denoiser layer's mixer input and its residual gate (``None`` without time conditioning)."""
        if embedding is None:
            return layer.norm(x), None
        shift, scale, gate = layer_modulation(self.scale_shift_tables, embedding, layer.layer_idx)
        if layer.block_type in (MAMBA, ATTENTION):
            return layer.norm(x * (1 + scale) + shift), gate
        return layer.norm(x) * (1 + scale) + shift, gate

    def time_embedding(self, t: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if t is None:
            return None
        t = torch.as_tensor(t, dtype=torch.float32, device=self.denoiser_device)
        if t.dim() == 0:
            t = t.expand(batch)
        return time_embedding(self.t_embedder, self.t_block, t)

    def prepare_context(
        self,
        cache: HybridCache,
        block_size: int,
        context_length: int | None = None,
        mamba_states: dict[int, MambaState] | None = None,
    ) -> "DenoiserContext":
        """Gather once per block what every denoiser pass reads from the context cache.

        When the block reads the whole context and the cache has room, block K/V are written into
        the cache's free positions ``[length, length + S)`` instead of concatenated with the context
        K/V on every pass. Those positions hold no context: the next extension overwrites them.
        """
        device = self.denoiser_device
        batch = cache.batch_size
        length = cache.length if context_length is None else context_length
        states = cache.mamba if mamba_states is None else mamba_states
        same_device = cache.device == device
        scratch = same_device and length == cache.length and cache.capacity >= length + block_size

        key_mask = cache.key_mask[:, :length].to(device)
        if bool(key_mask.all()):
            attn_mask = None
        else:
            full = torch.cat([key_mask, key_mask.new_ones(batch, block_size)], dim=1)
            attn_mask = full[:, None, None, :]  # every block position attends to the same keys

        if scratch:
            keys, values = cache.keys, cache.values
        else:
            keys = {i: k[:, :, :length].to(device) for i, k in cache.keys.items()}
            values = {i: v[:, :, :length].to(device) for i, v in cache.values.items()}
        seeds = {i: MambaState(s.conv.to(device), s.ssm.to(device)) for i, s in states.items()}
        return DenoiserContext(length, block_size, keys, values, seeds, attn_mask, scratch)

    def denoise(
        self,
        block_ids: torch.Tensor,
        context: "HybridCache | DenoiserContext",
        t: torch.Tensor | float | None,
        context_length: int | None = None,
        mamba_states: dict[int, MambaState] | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the denoiser over ``block_ids`` (B, S) against ``context``; return fp32 logits (B, S, V).

        ``t`` (B,) is each row's masked fraction, or ``None`` for no time conditioning (mock-AR).
        ``context`` is a cache, or a ``DenoiserContext`` from ``prepare_context`` (reused across the
        passes of one block). ``context_length`` limits the context K/V used (default: all of it)
        and ``mamba_states`` replaces the context's current Mamba states (mock-AR reads the states
        one token back). ``positions`` (B, K) limits the head to those block positions of each row
        and the logits to (B, K, V): the sampler needs no logits at committed positions, and the
        head is a large share of a pass. The context itself is never modified.
        """
        batch, block = block_ids.shape
        if isinstance(context, HybridCache):
            context = self.prepare_context(context, block, context_length, mamba_states)
        elif context.block_size != block:
            raise ValueError(f"block of {block} tokens does not match the prepared context's block_size={context.block_size}")

        return self._denoiser_forward(
            block_ids.to(self.denoiser_device), context, self.time_embedding(t, batch), positions
        )

    def _denoiser_forward(
        self,
        block_ids: torch.Tensor,
        context: "DenoiserContext",
        embedding: torch.Tensor | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The part of a denoiser pass that compile_steps() hands to torch.compile. It calls the mixers
        # directly rather than through denoiser_layer, because closures break torch.compile's graphs.
        x = self.denoiser_tower.embeddings(block_ids)
        for i, layer in enumerate(self.denoiser_tower.layers):
            h, gate = self.denoiser_norm(layer, x, embedding)
            if layer.block_type == MAMBA:
                out = layer.mixer(h, context.seeds[i], return_state=False).hidden
            elif layer.block_type == ATTENTION:
                out = context.attend(layer, i, h)
            else:
                out = layer.mixer(h)
            x = x + out if gate is None else x + gate * out
        if positions is not None:
            x = x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))
        return self.lm_head(self.denoiser_tower.norm_f(x)).float()

    # ------------------------------------------------------------------ compilation

    def compile_steps(self, **options: Any) -> "TwoTowerForCausalLM":
        """Compile the denoiser pass and the context tower's forward with ``torch.compile``; return self.

        Every mode then runs compiled code: AR decoding and context extension through the context
        tower, mask diffusion and mock-AR through the denoiser pass as well. Shapes are compiled as
        dynamic by default, so a longer context reuses compiled code. Sizes of 0 and 1 stay special
        cases, so batch 1 after batch 2 compiles again. ``options`` go to ``torch.compile`` (for
        example ``mode``). The first calls compile, which takes seconds to minutes. Call it after
        moving the model to its devices.

        NOTE: on a CPU (torch 2.13, inductor) the compiled demo model generated more slowly than the
        eager one, after two minutes of compilation, because the cache bookkeeping and the MoE
        dispatch break the graph into many pieces. It has not been measured on a GPU.
        """
        options.setdefault("dynamic", True)
        self.context_tower.compile(**options)
        self._denoiser_forward = torch.compile(self._denoiser_forward, **options)
        return self

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
                f"{path} contains no denoiser_tower.* tensors, so it is not a two-tower checkpoint; "
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


@dataclass
class DenoiserContext:
    """The context as the denoiser reads it during one block (see ``prepare_context``)."""

    length: int
    block_size: int
    keys: dict[int, torch.Tensor]  # (B, n_kv, >= length, P)
    values: dict[int, torch.Tensor]
    seeds: dict[int, MambaState]
    attn_mask: torch.Tensor | None  # (B, 1, 1, length + S) or None when no key is padding
    scratch: bool  # block K/V go to positions [length, length + S) of the buffers

    def select_rows(self, rows: torch.Tensor) -> "DenoiserContext":
        """Return the context of batch rows ``rows`` only: copies of their K/V, seeds and mask.

        The K/V copies leave room for the block, so passes write block K/V there instead of
        concatenating the whole context on every pass. The cache itself is not touched.
        """

        def gather(buffers: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            copies = {}
            for i, buffer in buffers.items():
                copy = buffer.new_empty(rows.numel(), buffer.shape[1], self.length + self.block_size, buffer.shape[3])
                copy[:, :, : self.length] = buffer[rows, :, : self.length]
                copies[i] = copy
            return copies

        seeds = {i: MambaState(s.conv[rows], s.ssm[rows]) for i, s in self.seeds.items()}
        attn_mask = None if self.attn_mask is None else self.attn_mask[rows]
        return DenoiserContext(
            self.length, self.block_size, gather(self.keys), gather(self.values), seeds, attn_mask, scratch=True
        )

    def attend(self, layer: NemotronHBlock, index: int, h: torch.Tensor) -> torch.Tensor:
        """Bidirectional attention of the block over [context K/V | block K/V] (no causal mask)."""
        q, k, v = layer.mixer.project(h)
        if self.scratch:
            end = self.length + k.shape[2]
            self.keys[index][:, :, self.length : end] = k
            self.values[index][:, :, self.length : end] = v
            keys, values = self.keys[index][:, :, :end], self.values[index][:, :, :end]
        else:
            keys = torch.cat([self.keys[index], k], dim=2)
            values = torch.cat([self.values[index], v], dim=2)
        return layer.mixer.attend(q, keys, values, self.attn_mask)
