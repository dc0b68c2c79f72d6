"""The two-tower model: the denoiser step against a slow reference, context extension, generation modes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from twotower import NemotronHConfig, NemotronHForCausalLM, TwoTowerForCausalLM
from twotower.config import ATTENTION, MAMBA, MLP, MOE

CONFIG = NemotronHConfig.tiny(initializer_range=0.1)
TOL = 1e-4  # fp32, absolute, on logits of magnitude ~1-10


def build(seed: int = 0) -> TwoTowerForCausalLM:
    model = TwoTowerForCausalLM.from_config(CONFIG, seed=seed).eval()
    with torch.no_grad():
        # Non-trivial correction biases, so selection and weighting of experts differ.
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return model


def prompt(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, CONFIG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- slow reference denoiser


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_time_embedding(model: TwoTowerForCausalLM, t: torch.Tensor) -> torch.Tensor:
    half = 128
    freqs = torch.tensor([math.exp(-math.log(10000.0) * k / half) for k in range(half)])
    angles = 1000.0 * t[:, None] * freqs[None]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    mlp = model.t_embedder.mlp
    emb = F.linear(F.silu(F.linear(features, mlp[0].weight, mlp[0].bias)), mlp[2].weight, mlp[2].bias)
    return F.linear(F.silu(emb), model.t_block[1].weight, model.t_block[1].bias).view(-1, 3, CONFIG.hidden_size)


def reference_mamba(mixer, h: torch.Tensor, seed_conv: torch.Tensor, seed_ssm: torch.Tensor) -> torch.Tensor:
    """Mamba-2 written out: explicit conv taps and a token-by-token recurrence from the seed state."""
    cfg = CONFIG
    inner, groups, n = cfg.mamba_intermediate_size, cfg.n_groups, cfg.ssm_state_size
    heads, p = cfg.mamba_num_heads, cfg.mamba_head_dim
    proj = F.linear(h, mixer.in_proj.weight)
    z, xbc_raw, dt_raw = proj[..., :inner], proj[..., inner : inner + mixer.conv_dim], proj[..., inner + mixer.conv_dim :]

    history = torch.cat([seed_conv.transpose(1, 2), xbc_raw], dim=1)  # (B, K-1+S, D)
    kernel = cfg.conv_kernel
    weight = mixer.conv1d.weight[:, 0, :]  # (D, K)
    steps = xbc_raw.shape[1]
    xbc = torch.stack(
        [sum(history[:, s + j] * weight[:, j] for j in range(kernel)) + mixer.conv1d.bias for s in range(steps)], dim=1
    )
    xbc = F.silu(xbc)
    x = xbc[..., :inner].reshape(*xbc.shape[:2], heads, p)
    B = xbc[..., inner : inner + groups * n].reshape(*xbc.shape[:2], groups, n)
    C = xbc[..., inner + groups * n :].reshape(*xbc.shape[:2], groups, n)
    dt = F.softplus(dt_raw + mixer.dt_bias)
    A = -torch.exp(mixer.A_log)

    state = seed_ssm.clone()
    ys = []
    per_group = heads // groups
    for s in range(steps):
        y_s = torch.empty(x.shape[0], heads, p)
        for head in range(heads):
            g = head // per_group
            decay = torch.exp(dt[:, s, head] * A[head])[:, None, None]
            state[:, head] = decay * state[:, head] + dt[:, s, head][:, None, None] * x[:, s, head][:, :, None] * B[:, s, g][:, None, :]
            y_s[:, head] = (state[:, head] * C[:, s, g][:, None, :]).sum(-1) + mixer.D[head] * x[:, s, head]
        ys.append(y_s.reshape(x.shape[0], inner))
    y = torch.stack(ys, dim=1) * F.silu(z)
    y = y.view(*y.shape[:2], groups, inner // groups)
    y = (y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_epsilon)).reshape(*y.shape[:2], inner)
    return F.linear(y * mixer.norm.weight, mixer.out_proj.weight)


def reference_attention(attn, h: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor) -> torch.Tensor:
    """Concatenated [context | block] keys, GQA expanded, eager fp32 softmax, no mask."""
    b, s, _ = h.shape
    q = F.linear(h, attn.q_proj.weight).view(b, s, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = F.linear(h, attn.k_proj.weight).view(b, s, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = F.linear(h, attn.v_proj.weight).view(b, s, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    k = torch.cat([ctx_k, k], dim=2).repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    v = torch.cat([ctx_v, v], dim=2).repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    weights = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim), dim=-1)
    return F.linear((weights @ v).transpose(1, 2).reshape(b, s, -1), attn.o_proj.weight)


def reference_denoise(model, block, cache, t, swap_order: bool = False) -> torch.Tensor:
    """The denoiser pass written plainly; ``swap_order`` uses the wrong modulate/norm order everywhere."""
    eps = CONFIG.layer_norm_epsilon
    temb = reference_time_embedding(model, t)
    x = model.denoiser_tower.embeddings.weight[block]
    for i, layer in enumerate(model.denoiser_tower.layers):
        shift, scale, gate = (model.scale_shift_tables[i] + temb).unbind(1)
        shift, scale, gate = shift[:, None], scale[:, None], gate[:, None]
        modulate_first = layer.block_type in (MAMBA, ATTENTION)
        if swap_order:
            modulate_first = not modulate_first
        if modulate_first:
            h = rms(x * (1 + scale) + shift, layer.norm.weight, eps)
        else:
            h = rms(x, layer.norm.weight, eps) * (1 + scale) + shift
        if layer.block_type == MAMBA:
            out = reference_mamba(layer.mixer, h, cache.mamba[i].conv, cache.mamba[i].ssm)
        elif layer.block_type == ATTENTION:
            out = reference_attention(layer.mixer, h, cache.keys[i][:, :, : cache.length], cache.values[i][:, :, : cache.length])
        elif layer.block_type == MOE:
            out = layer.mixer(h, dispatch="loop")
        else:
            assert layer.block_type == MLP
            out = F.linear(torch.relu(F.linear(h, layer.mixer.up_proj.weight)) ** 2, layer.mixer.down_proj.weight)
        x = x + gate * out
    return F.linear(rms(x, model.denoiser_tower.norm_f.weight, eps), model.lm_head.weight)


@torch.no_grad()
def test_denoiser_matches_reference():
    model = build()
    cache = model.new_cache(2)
    model.extend_context(prompt(), cache)
    block = prompt(2, 8, seed=1)
    block[:, ::2] = CONFIG.mask_token_id
    t = torch.tensor([0.5, 0.875])

    fast = model.denoise(block, cache, t)
    slow = reference_denoise(model, block, cache, t)
    assert (fast - slow).abs().max() < TOL


@torch.no_grad()
def test_reference_detects_swapped_norm_order():
    model = build()
    cache = model.new_cache(2)
    model.extend_context(prompt(), cache)
    block = prompt(2, 8, seed=1)
    t = torch.tensor([0.5, 0.875])

    fast = model.denoise(block, cache, t)
    swapped = reference_denoise(model, block, cache, t, swap_order=True)
    assert (fast - swapped).abs().max() > 100 * TOL


@torch.no_grad()
def test_denoiser_leaves_context_cache_unchanged():
    model = build()
    cache = model.new_cache(2)
    model.extend_context(prompt(), cache)
    before = cache.clone()
    model.denoise(prompt(2, 8, seed=1), cache, torch.tensor([1.0, 1.0]))
    assert cache.length == before.length
    for i in cache.mamba:
        assert torch.equal(cache.mamba[i].ssm, before.mamba[i].ssm)
        assert torch.equal(cache.mamba[i].conv, before.mamba[i].conv)
    # Positions past the context length are free space that the denoiser may use for block K/V.
    for i in cache.keys:
        assert torch.equal(cache.keys[i][:, :, : cache.length], before.keys[i][:, :, : cache.length])
        assert torch.equal(cache.values[i][:, :, : cache.length], before.values[i][:, :, : cache.length])
    assert torch.equal(cache.key_mask, before.key_mask)


@torch.no_grad()
def test_prepared_context_paths_agree():
    model = build()
    cache = model.new_cache(2, capacity=11)  # too small for the block: the concatenating path
    model.extend_context(prompt(), cache)
    roomy = model.new_cache(2, capacity=64)  # room for the block: K/V written in place
    model.extend_context(prompt(), roomy)
    block = prompt(2, 8, seed=1)
    t = torch.tensor([0.5, 1.0])
    concatenated = model.prepare_context(cache, 8)
    in_place = model.prepare_context(roomy, 8)
    assert not concatenated.scratch
    assert in_place.scratch
    assert (model.denoise(block, concatenated, t) - model.denoise(block, in_place, t)).abs().max() < 1e-5


@pytest.mark.parametrize("capacity", [11, 64])
@torch.no_grad()
def test_selected_rows_denoise_like_full_batch(capacity):
    model = build()
    ids, mask = left_pad([prompt(1, n, seed=n)[0] for n in (3, 9, 6)])
    cache = model.new_cache(3, capacity=capacity)
    model.extend_context(ids, cache, attention_mask=mask)
    block = prompt(3, 8, seed=2)
    t = torch.tensor([0.25, 0.5, 1.0])
    context = model.prepare_context(cache, 8)
    full = model.denoise(block, context, t)

    rows = torch.tensor([0, 2])
    selection = context.select_rows(rows)
    selected = model.denoise(block[rows], selection, t[rows])
    torch.testing.assert_close(selected, full[rows], rtol=1e-5, atol=1e-5)
    # A second pass on the same selection overwrites the block slots of its K/V copies.
    again = model.denoise(block[rows], selection, t[rows])
    torch.testing.assert_close(again, selected, rtol=0, atol=0)


@torch.no_grad()
def test_head_positions_match_full_logits():
    model = build()
    cache = model.new_cache(2, capacity=32)
    model.extend_context(prompt(), cache)
    block = prompt(2, 8, seed=3)
    t = torch.tensor([0.5, 0.75])
    context = model.prepare_context(cache, 8)
    full = model.denoise(block, context, t)
    positions = torch.tensor([[1, 4, 6], [7, 0, 2]])
    picked = model.denoise(block, context, t, positions=positions)
    assert picked.shape == (2, 3, model.config.vocab_size)
    torch.testing.assert_close(picked, full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1])))


@torch.no_grad()
def test_timestep_is_per_row():
    model = build()
    cache = model.new_cache(2)
    model.extend_context(prompt(), cache)
    block = prompt(2, 8, seed=1)
    both = model.denoise(block, cache, torch.tensor([0.25, 1.0]))
    row0 = model.denoise(block, cache, torch.tensor([0.25, 0.25]))[0]
    row1 = model.denoise(block, cache, torch.tensor([1.0, 1.0]))[1]
    assert (both[0] - row0).abs().max() < 1e-5
    assert (both[1] - row1).abs().max() < 1e-5
    assert (row0 - model.denoise(block, cache, torch.tensor([1.0, 1.0]))[0]).abs().max() > 1e-3


# ---------------------------------------------------------------------- context extension


@pytest.mark.parametrize("block_size", [1, 3, 16])
@torch.no_grad()
def test_extend_by_block_equals_token_by_token(block_size):
    model = build()
    ids = prompt(2, 9)
    block = prompt(2, block_size, seed=2)
    whole = model.new_cache(2)
    model.extend_context(ids, whole)
    stepwise = whole.clone()
    model.extend_context(block, whole)
    for j in range(block_size):
        model.extend_context(block[:, j : j + 1], stepwise)

    assert whole.length == stepwise.length
    for i in whole.mamba:
        assert (whole.mamba[i].ssm - stepwise.mamba[i].ssm).abs().max() < 1e-5
        assert (whole.mamba[i].conv - stepwise.mamba[i].conv).abs().max() < 1e-5
    for i in whole.keys:
        assert (whole.keys[i][:, :, : whole.length] - stepwise.keys[i][:, :, : whole.length]).abs().max() < 1e-5
    after = prompt(2, 4, seed=3)
    assert (model.denoise(after, whole, torch.tensor([1.0, 1.0])) - model.denoise(after, stepwise, torch.tensor([1.0, 1.0]))).abs().max() < TOL


# ---------------------------------------------------------------------- generation modes


def run_mode(model, mode, ids, attention_mask=None, **kwargs):
    common = dict(max_new_tokens=kwargs.pop("max_new_tokens", 12), attention_mask=attention_mask, return_dict_in_generate=True)
    if mode == "diffusion":
        return model.generate_mask_diffusion(ids, block_size=5, steps_per_block=3, confidence_threshold=0.3, **common, **kwargs)
    if mode == "mock-ar":
        return model.generate_mock_ar(ids, **common, **kwargs)
    return model.generate(ids, **common, **kwargs)


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return ids, mask


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar", "ar"])
@torch.no_grad()
def test_batched_left_padded_equals_single(mode):
    model = build()
    prompts = [prompt(1, n, seed=n)[0] for n in (3, 9, 6)]
    ids, mask = left_pad(prompts)
    batched = run_mode(model, mode, ids, mask)
    for row, p in enumerate(prompts):
        alone = run_mode(model, mode, p[None])
        assert batched.new_tokens[row].tolist() == alone.new_tokens[0].tolist(), f"row {row}"


@pytest.mark.parametrize("max_new_tokens", [1, 7, 16, 17])
@torch.no_grad()
def test_diffusion_short_last_block(max_new_tokens):
    model = build()
    out = model.generate_mask_diffusion(
        prompt(), max_new_tokens=max_new_tokens, block_size=8, steps_per_block=4, return_dict_in_generate=True
    )
    assert out.new_tokens.shape == (2, max_new_tokens)
    assert out.stats.blocks == math.ceil(max_new_tokens / 8)
    assert not (out.new_tokens == CONFIG.mask_token_id).any()


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar", "ar"])
@torch.no_grad()
def test_eos_trims_and_reports_stop(mode):
    model = build()
    ids = prompt(3, 7)
    free = run_mode(model, mode, ids, max_new_tokens=12)
    # Declare a token that row 0 produces mid-way to be EOS; the row must stop there.
    eos = free.new_tokens[0, 6].item()
    out = run_mode(model, mode, ids, max_new_tokens=12, eos_token_id=eos)
    row = out.new_tokens[0].tolist()
    first = row.index(eos)
    assert first <= 6
    assert all(tok == CONFIG.pad_token_id for tok in row[first + 1 :])
    assert out.finish_reasons[0] == "stop"
    assert out.new_token_lists()[0] == row[: first + 1]
    for r in range(3):
        if eos not in out.new_tokens[r].tolist():
            assert out.finish_reasons[r] == "length"


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar", "ar"])
@torch.no_grad()
def test_seed_reproducible(mode):
    model = build()
    ids = prompt()
    sample = {"temperature": 1.0, "top_k": 50} if mode != "ar" else {"do_sample": True, "temperature": 1.0, "top_k": 50}
    a = run_mode(model, mode, ids, seed=7, **sample).new_tokens
    b = run_mode(model, mode, ids, seed=7, **sample).new_tokens
    c = run_mode(model, mode, ids, seed=8, **sample).new_tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(a, run_mode(model, mode, ids, generator=gen, **sample).new_tokens)


@torch.no_grad()
def test_suppressed_ids_never_emitted():
    model = build()
    free = run_mode(model, "diffusion", prompt(), max_new_tokens=10)
    banned = sorted(set(free.new_tokens.flatten().tolist()))[:5]
    out = run_mode(model, "diffusion", prompt(), max_new_tokens=10, suppress_token_ids=banned, temperature=1.0, seed=0)
    assert not torch.isin(out.new_tokens, torch.tensor(banned + [CONFIG.mask_token_id])).any()


@torch.no_grad()
def test_stream_equals_final():
    model = build()
    ids = prompt()
    stream = model.stream_mask_diffusion(ids, max_new_tokens=13, block_size=5, steps_per_block=3)
    rows = [[], []]
    while True:
        try:
            chunk = next(stream)
        except StopIteration as stop:
            final = stop.value
            break
        assert len(chunk.tokens[0]) <= 5
        for r in range(2):
            rows[r].extend(chunk.tokens[r])
    assert rows == final.new_token_lists()


@torch.no_grad()
def test_hf_streamer_receives_blocks():
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    model = build()
    ids = prompt(1)
    recorder = Recorder()
    out = model.generate_mask_diffusion(ids, max_new_tokens=12, block_size=4, steps_per_block=2, streamer=recorder)
    assert recorder.ended
    assert recorder.puts[0] == ids.tolist()
    assert [tok for put in recorder.puts[1:] for tok in put] == out[0, ids.shape[1] :].tolist()
    assert len(recorder.puts) == 1 + 3


@torch.no_grad()
def test_diffusion_statistics():
    model = build()
    out = model.generate_mask_diffusion(
        prompt(), max_new_tokens=16, block_size=8, steps_per_block=4, confidence_threshold=1.0, return_dict_in_generate=True
    )
    stats = out.stats
    assert stats.blocks == 2
    assert stats.passes_per_block == [4, 4]
    assert stats.denoiser_passes == 8
    assert stats.context_passes == 1  # the last block is never appended
    assert stats.generated_tokens == 32
    assert stats.denoise_s > 0
    assert stats.total_s >= stats.denoise_s


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"block_size": 0}, "block_size"),
        ({"steps_per_block": 0}, "steps_per_block"),
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
        ({"confidence_threshold": -0.1}, "confidence_threshold"),
        ({"temperature": -1.0}, "temperature"),
        ({"mask_token_id": CONFIG.vocab_size}, "mask_token_id"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_invalid_arguments_raise(kwargs, field):
    model = build()
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=field):
        model.generate_mask_diffusion(prompt(), **args)


def test_empty_prompt_raises():
    model = build()
    for call in (model.generate_mask_diffusion, model.generate_mock_ar, model.generate):
        with pytest.raises(ValueError, match="empty prompt"):
            call(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)


# ---------------------------------------------------------------------- construction and I/O


@torch.no_grad()
def test_from_single_tower_ar_equals_single_model():
    single = NemotronHForCausalLM.from_config(CONFIG, seed=3).eval()
    two = TwoTowerForCausalLM.from_single_tower(single)
    ids = prompt()
    expected = single.generate(ids, max_new_tokens=20)
    assert torch.equal(two.generate(ids, max_new_tokens=20), expected)
    # Both towers start as copies; the denoiser's weights are independent tensors.
    assert torch.equal(two.denoiser_tower.embeddings.weight, two.context_tower.embeddings.weight)
    assert two.denoiser_tower.embeddings.weight.data_ptr() != two.context_tower.embeddings.weight.data_ptr()
    assert all(table.abs().sum() > 0 for table in two.scale_shift_tables)


@torch.no_grad()
def test_save_load_round_trip_bit_exact(tmp_path):
    model = build()
    model.save_pretrained(tmp_path, max_shard_size="100KB", remote_code=False)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = TwoTowerForCausalLM.from_pretrained(tmp_path)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    ids = prompt()
    assert torch.equal(
        run_mode(model, "diffusion", ids).sequences, run_mode(loaded, "diffusion", ids).sequences
    )


def test_released_parameter_names():
    names = set(build().state_dict())
    for expected in (
        "context_tower.embeddings.weight",
        "context_tower.layers.0.mixer.A_log",
        "context_tower.layers.1.mixer.experts.7.up_proj.weight",
        "context_tower.layers.1.mixer.gate.e_score_correction_bias",
        "context_tower.norm_f.weight",
        "context_lm_head.weight",
        "denoiser_tower.layers.2.mixer.q_proj.weight",
        "lm_head.weight",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.bias",
        "t_block.1.weight",
        "scale_shift_tables.6",
    ):
        assert expected in names, expected
    assert tuple(build().scale_shift_tables[0].shape) == (3, CONFIG.hidden_size)


@torch.no_grad()
def test_bf16_diffusion_runs():
    model = build().to(torch.bfloat16)
    out = run_mode(model, "diffusion", prompt())
    assert out.new_tokens.shape == (2, 12)
    cache = model.new_cache(2)
    model.extend_context(prompt(), cache)
    assert cache.mamba[0].ssm.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"eos_token_id": "2"}, "eos_token_id"),
        ({"eos_token_id": 2.0}, "eos_token_id"),
        ({"eos_token_id": [10**30]}, "eos_token_id"),
        ({"suppress_token_ids": [CONFIG.vocab_size + 5]}, "suppress_token_ids"),
        ({"suppress_token_ids": list(range(CONFIG.vocab_size))}, "suppress_token_ids"),
        ({"seed": 2**70}, "seed"),
        ({"mask_token_id": True}, "mask_token_id"),
        ({"confidence_threshold": True}, "confidence_threshold"),
    ],
)
def test_invalid_token_and_number_arguments_raise(kwargs, field):
    model = build()
    with pytest.raises(ValueError, match=field):
        model.generate_mask_diffusion(prompt(), max_new_tokens=4, **kwargs)


@pytest.mark.parametrize("mode", ["mock-ar", "ar"])
def test_ar_modes_reject_bad_token_arguments(mode):
    model = build()
    call = model.generate_mock_ar if mode == "mock-ar" else model.generate
    with pytest.raises(ValueError, match="eos_token_id"):
        call(prompt(), max_new_tokens=4, eos_token_id="2")
    with pytest.raises(ValueError, match="suppress_token_ids"):
        call(prompt(), max_new_tokens=4, suppress_token_ids=[-1])


@torch.no_grad()
def test_small_integer_prompt_dtypes_accepted():
    model = build()
    ids = prompt()
    expected = run_mode(model, "diffusion", ids).new_tokens
    assert torch.equal(run_mode(model, "diffusion", ids.to(torch.int16)).new_tokens, expected)
    with pytest.raises(ValueError, match="input_ids"):
        run_mode(model, "diffusion", ids.float())
