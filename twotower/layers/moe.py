"""Mixture of experts with a float64 sigmoid router and relu² experts.

Routing (as in the released checkpoints): ``s = sigmoid(x @ W_gate^T)`` in float64; experts are
*selected* on ``s + e_score_correction_bias`` (within the best ``topk_group`` of ``n_group`` expert
groups when ``n_group > 1``) but *weighted* by the unbiased ``s``, normalised to sum to 1 when
``norm_topk_prob`` and multiplied by ``routed_scaling_factor``. float64 keeps the selection stable
across batch sizes, where fp32 rounding can flip near-ties between experts.
"""

from __future__ import annotations

import torch
from torch import nn

from twotower.config import NemotronHConfig
from twotower.layers.mlp import ReLU2MLP


class TopKRouter(nn.Module):
    def __init__(self, config: NemotronHConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # Moving the model to bf16 must not round the correction bias: it decides near-ties.
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        if bias.is_meta or moved.is_meta:
            # Nothing to preserve (e.g. ``to_empty`` of a model built on the meta device).
            self.e_score_correction_bias = moved.float()
        else:
            self.e_score_correction_bias = bias.to(device=moved.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route tokens ``x`` (T, H); return (weights (T, K) float32, expert ids (T, K) int64)."""
        logits = nn.functional.linear(x.double(), self.weight.double())  # (T, E)
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias.double()

        if self.n_group > 1:
            grouped = choice.unflatten(-1, (self.n_group, -1))  # (T, groups, E/groups)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            best_groups = group_scores.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)

        expert_ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, expert_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        return weights.float(), expert_ids


class MoE(nn.Module):
    def __init__(self, config: NemotronHConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.gate = TopKRouter(config)

        expert_width = config.moe_latent_size or config.hidden_size
        self.experts = nn.ModuleList(
            ReLU2MLP(expert_width, config.moe_intermediate_size, bias=config.mlp_bias)
            for _ in range(config.n_routed_experts)
        )
        if config.moe_shared_expert_intermediate_size > 0:
            self.shared_experts = ReLU2MLP(
                config.hidden_size, config.moe_shared_expert_intermediate_size, bias=config.mlp_bias
            )
        else:
            self.shared_experts = None
        if config.moe_latent_size is not None:
            # Latent projections wrap the routed experts only; the router and shared expert see x.
            self.fc1_latent_proj = nn.Linear(config.hidden_size, config.moe_latent_size, bias=config.mlp_bias)
            self.fc2_latent_proj = nn.Linear(config.moe_latent_size, config.hidden_size, bias=config.mlp_bias)
        else:
            self.fc1_latent_proj = None
            self.fc2_latent_proj = None

    def forward(self, x: torch.Tensor, dispatch: str = "grouped") -> torch.Tensor:
        """Apply the layer to ``x`` (..., H). ``dispatch="loop"`` runs the slow per-expert reference."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (T, H)
        weights, expert_ids = self.gate(tokens)

        routed_in = self.fc1_latent_proj(tokens) if self.fc1_latent_proj is not None else tokens
        if dispatch == "grouped":
            routed = self._grouped_dispatch(routed_in, weights, expert_ids)
        elif dispatch == "loop":
            routed = self._reference_loop(routed_in, weights, expert_ids)
        else:
            raise ValueError(f"dispatch={dispatch!r} is invalid; expected 'grouped' or 'loop'")
        routed = routed.to(x.dtype)
        if self.fc2_latent_proj is not None:
            routed = self.fc2_latent_proj(routed)

        out = routed
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        return out.reshape(shape)

    def _grouped_dispatch(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Sort the (token, expert) pairs by expert and run each active expert once on its tokens."""
        flat_ids = expert_ids.reshape(-1)  # (T*K,)
        order = flat_ids.argsort(stable=True)
        token_of_pair = order // self.top_k
        # NOTE: reading the counts back is a host sync per MoE layer, which stalls a GPU's launch
        # queue. A grouped GEMM over stacked expert weights would remove it.
        counts = torch.bincount(flat_ids, minlength=self.n_experts).tolist()

        x_sorted = x[token_of_pair]  # (T*K, H)
        outputs = []
        start = 0
        for expert, count in enumerate(counts):
            if count:
                outputs.append(self.experts[expert](x_sorted[start : start + count]))
                start += count
        y_sorted = torch.cat(outputs).float() * weights.reshape(-1)[order, None]

        out = torch.zeros(x.shape[0], y_sorted.shape[-1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, token_of_pair, y_sorted)

    def _reference_loop(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Slow oracle: every expert, every token, weight zero where the token did not choose it."""
        out = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float32, device=x.device)
        for expert in range(self.n_experts):
            chosen = expert_ids == expert  # (T, K)
            token_weight = (weights * chosen).sum(-1)  # (T,)
            rows = chosen.any(-1)
            if rows.any():
                y = self.experts[expert](x[rows]).float()
                out[rows] += y * token_weight[rows, None]
        return out
