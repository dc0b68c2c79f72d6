"""Tests for the Mamba-2 scan and mixer and the MoE layer against their slow reference paths."""

from __future__ import annotations

import pytest
import torch

from twotower.layers.mamba2 import Mamba2Mixer, MambaState
from twotower.layers.moe import MoE
from twotower.layers.ssd import ssd_block_scan, ssd_chunk_scan, ssd_sequential

from tower_helpers import (  # noqa: F401 (inference_on_one_thread is an autouse fixture)
    CONFIGS,
    LATENT,
    TINY,
    build_model,
    inference_on_one_thread,
    routers,
)

BATCH, LENGTH, HEADS, HEAD_DIM, GROUPS, STATE = 2, 37, 4, 8, 2, 16


def scan_inputs(seed: int = 0, length: int = LENGTH):
    """Random SSD inputs whose decays span exp(-0.01) to exp(-3) per step."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, length, HEADS, HEAD_DIM, generator=generator)
    dt = torch.nn.functional.softplus(torch.randn(BATCH, length, HEADS, generator=generator)) * 0.5
    A = -torch.exp(torch.rand(HEADS, generator=generator) * 2)
    B = torch.randn(BATCH, length, GROUPS, STATE, generator=generator)
    C = torch.randn(BATCH, length, GROUPS, STATE, generator=generator)
    initial = torch.randn(BATCH, HEADS, HEAD_DIM, STATE, generator=generator)
    return x, dt, A, B, C, initial


# ---------------------------------------------------------------------- SSD scan


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 37, 64])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunk_scan_matches_sequential(chunk_size, with_initial_state):
    x, dt, A, B, C, initial = scan_inputs()
    initial = initial if with_initial_state else None

    y, final, states_at = ssd_chunk_scan(x, dt, A, B, C, chunk_size, initial_state=initial)
    y_ref, final_ref = ssd_sequential(x, dt, A, B, C, initial_state=initial)

    assert states_at is None
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length", [1, 2, 16])
def test_block_scan_matches_sequential(length):
    x, dt, A, B, C, initial = scan_inputs(seed=5, length=length)
    y = ssd_block_scan(x, dt, A, B, C, initial)
    y_ref, _ = ssd_sequential(x, dt, A, B, C, initial_state=initial)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def test_initial_state_changes_outputs():
    # Guards the test above: a scan that ignored the initial state would otherwise pass half of it.
    x, dt, A, B, C, initial = scan_inputs()
    y_zero, _, _ = ssd_chunk_scan(x, dt, A, B, C, 8)
    y_init, _, _ = ssd_chunk_scan(x, dt, A, B, C, 8, initial_state=initial)
    assert (y_zero - y_init).abs().max() > 1e-2


@pytest.mark.parametrize("chunk_size", [8, 16])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_states_at_match_sequential(chunk_size, with_initial_state):
    x, dt, A, B, C, initial = scan_inputs(seed=1)
    initial = initial if with_initial_state else None
    positions = [0, 5, 7, 8, 15, 16, 20, 35, 36]

    _, final, states_at = ssd_chunk_scan(x, dt, A, B, C, chunk_size, initial_state=initial, return_states_at=positions)

    assert states_at.shape == (BATCH, len(positions), HEADS, HEAD_DIM, STATE)
    for index, position in enumerate(positions):
        end = position + 1
        _, expected = ssd_sequential(x[:, :end], dt[:, :end], A, B[:, :end], C[:, :end], initial_state=initial)
        torch.testing.assert_close(states_at[:, index], expected, rtol=1e-4, atol=1e-4, msg=f"position {position}")
    torch.testing.assert_close(states_at[:, -1], final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", [[LENGTH], [-1], [0, LENGTH + 3]])
def test_states_at_out_of_range_raises(positions):
    x, dt, A, B, C, _ = scan_inputs()
    with pytest.raises(ValueError, match="return_states_at"):
        ssd_chunk_scan(x, dt, A, B, C, 8, return_states_at=positions)


def test_chunk_size_zero_raises():
    x, dt, A, B, C, _ = scan_inputs()
    with pytest.raises(ValueError, match="chunk_size=0 is invalid"):
        ssd_chunk_scan(x, dt, A, B, C, 0)


def test_zero_dt_leaves_state_unchanged():
    # Padding relies on this: a position with dt = 0 neither decays nor feeds the state.
    x, dt, A, B, C, initial = scan_inputs()
    dt = torch.zeros_like(dt)
    _, final, _ = ssd_chunk_scan(x, dt, A, B, C, 8, initial_state=initial)
    torch.testing.assert_close(final, initial)


# ---------------------------------------------------------------------- Mamba-2 mixer


def mixer_and_state(seed: int = 0) -> tuple[Mamba2Mixer, MambaState]:
    """The first Mamba layer of a seeded model and a nonzero state reached by running 11 tokens."""
    model = build_model(TINY, seed)
    mixer = model.backbone.layers[TINY.layer_indices("M")[0]].mixer
    generator = torch.Generator().manual_seed(seed)
    warmup = torch.randn(BATCH, 11, TINY.hidden_size, generator=generator)
    state = mixer(warmup).state
    return mixer, state


@pytest.mark.parametrize("scan", ["chunked", "sequential"])
@pytest.mark.parametrize("length", [2, 8, 9, 13, 30])
def test_return_previous_is_state_one_token_back(scan, length):
    mixer, state = mixer_and_state()
    hidden = torch.randn(BATCH, length, TINY.hidden_size, generator=torch.Generator().manual_seed(length))

    out = mixer(hidden, state, return_previous=True, scan=scan)
    shorter = mixer(hidden[:, :-1], state, scan=scan)

    # in_proj over a different length may round differently, so the conv inputs match to 1 ulp, not bit for bit.
    torch.testing.assert_close(out.previous.conv, shorter.state.conv, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.previous.ssm, shorter.state.ssm, rtol=1e-5, atol=1e-5)
    assert (out.previous.ssm - out.state.ssm).abs().max() > 1e-3


def test_return_previous_single_token_is_input_state():
    mixer, state = mixer_and_state()
    hidden = torch.randn(BATCH, 1, TINY.hidden_size)
    out = mixer(hidden, state, return_previous=True)
    torch.testing.assert_close(out.previous.ssm, state.ssm, rtol=0, atol=0)
    torch.testing.assert_close(out.previous.conv, state.conv, rtol=0, atol=0)


def test_mixer_split_input_matches_whole():
    mixer, state = mixer_and_state()
    hidden = torch.randn(BATCH, 20, TINY.hidden_size, generator=torch.Generator().manual_seed(3))
    whole = mixer(hidden, state)
    first = mixer(hidden[:, :7], state)
    second = mixer(hidden[:, 7:], first.state)
    torch.testing.assert_close(torch.cat([first.hidden, second.hidden], dim=1), whole.hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.state.ssm, whole.state.ssm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.state.conv, whole.state.conv, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [4, 8])
def test_mixer_states_at_match_prefix_runs(chunk_size):
    mixer, state = mixer_and_state()
    hidden = torch.randn(BATCH, 19, TINY.hidden_size, generator=torch.Generator().manual_seed(8))
    positions = [0, 3, 4, 10, 18]

    out = mixer(hidden, state, chunk_size=chunk_size, return_states_at=positions, return_previous=True)

    shorter = mixer(hidden[:, :-1], state)
    torch.testing.assert_close(out.previous.ssm, shorter.state.ssm, rtol=1e-5, atol=1e-5)
    assert out.states_at.conv.shape == (BATCH, len(positions), TINY.mamba_conv_dim, TINY.conv_kernel - 1)
    for index, position in enumerate(positions):
        prefix = mixer(hidden[:, : position + 1], state)
        torch.testing.assert_close(out.states_at.ssm[:, index], prefix.state.ssm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.states_at.conv[:, index], prefix.state.conv, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [3, 8, 128])
def test_mixer_sequential_scan_matches_chunked(chunk_size):
    mixer, state = mixer_and_state()
    hidden = torch.randn(BATCH, 25, TINY.hidden_size, generator=torch.Generator().manual_seed(4))
    chunked = mixer(hidden, state, chunk_size=chunk_size)
    sequential = mixer(hidden, state, scan="sequential")
    torch.testing.assert_close(chunked.hidden, sequential.hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.state.ssm, sequential.state.ssm, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [2, 16])
def test_mixer_without_state_matches_sequential(length):
    mixer, state = mixer_and_state()
    hidden = torch.randn(BATCH, length, TINY.hidden_size, generator=torch.Generator().manual_seed(6))
    light = mixer(hidden, state, return_state=False)
    sequential = mixer(hidden, state, scan="sequential")
    assert light.state is None
    torch.testing.assert_close(light.hidden, sequential.hidden, rtol=1e-5, atol=1e-5)


def test_mixer_unknown_scan_raises():
    mixer, state = mixer_and_state()
    with pytest.raises(ValueError, match="scan='fast' is invalid"):
        mixer(torch.randn(BATCH, 4, TINY.hidden_size), state, scan="fast")


# ---------------------------------------------------------------------- MoE


def moe_layer(config, seed: int = 0) -> MoE:
    model = build_model(config, seed)
    return model.backbone.layers[config.layer_indices("E")[0]].mixer


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("tokens", [1, 5, 50])
def test_grouped_dispatch_matches_loop(name, tokens):
    moe = moe_layer(CONFIGS[name])
    x = torch.randn(tokens, CONFIGS[name].hidden_size, generator=torch.Generator().manual_seed(tokens))
    grouped = moe(x, dispatch="grouped")
    loop = moe(x, dispatch="loop")
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-6)


def test_dispatch_keeps_leading_shape():
    moe = moe_layer(TINY)
    x = torch.randn(3, 7, TINY.hidden_size)
    out = moe(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, moe(x.reshape(21, -1)).reshape(3, 7, -1))


def test_unknown_dispatch_raises():
    moe = moe_layer(TINY)
    with pytest.raises(ValueError, match="dispatch='fused' is invalid"):
        moe(torch.randn(2, TINY.hidden_size), dispatch="fused")


def test_router_uses_many_experts():
    # The dispatch tests only mean something when tokens spread over experts.
    moe = moe_layer(TINY)
    _, ids = moe.gate(torch.randn(64, TINY.hidden_size))
    assert ids.unique().numel() == TINY.n_routed_experts


def test_group_selection_limits_experts():
    # LATENT keeps 2 of 4 groups of 2 experts, so every token's experts come from at most 2 groups.
    moe = moe_layer(LATENT)
    _, ids = moe.gate(torch.randn(64, LATENT.hidden_size))
    groups = ids // (LATENT.n_routed_experts // LATENT.n_group)
    for row in groups.tolist():
        assert len(set(row)) <= LATENT.topk_group


def test_router_weights_sum_to_scaling_factor():
    moe = moe_layer(TINY)
    weights, ids = moe.gate(torch.randn(16, TINY.hidden_size))
    assert weights.dtype == torch.float32
    assert ids.shape == (16, TINY.num_experts_per_tok)
    torch.testing.assert_close(weights.sum(-1), torch.full((16,), TINY.routed_scaling_factor))


def near_tie_router(config):
    """A router whose experts 0 and 1 differ by 1e-6 in weights and bias, so scores nearly tie."""
    model = build_model(config)
    router = routers(model)[0]
    generator = torch.Generator().manual_seed(5)
    router.weight[1] = router.weight[0] + 1e-6 * torch.randn(router.weight.shape[1], generator=generator)
    router.e_score_correction_bias[1] = router.e_score_correction_bias[0] + 1e-6
    return router


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_router_same_experts_alone_and_in_batch(name):
    router = near_tie_router(CONFIGS[name])
    x = torch.randn(64, CONFIGS[name].hidden_size, generator=torch.Generator().manual_seed(6))
    batch_weights, batch_ids = router(x)
    for row in range(64):
        weights, ids = router(x[row : row + 1])
        assert torch.equal(ids[0], batch_ids[row]), f"token {row}"
        torch.testing.assert_close(weights[0], batch_weights[row], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_router_repeated_runs_identical(name):
    router = near_tie_router(CONFIGS[name])
    x = torch.randn(64, CONFIGS[name].hidden_size, generator=torch.Generator().manual_seed(7))
    first_weights, first_ids = router(x)
    for _ in range(3):
        weights, ids = router(x)
        assert torch.equal(ids, first_ids)
        assert torch.equal(weights, first_weights)


def test_router_bias_fp32_after_bf16_cast():
    moe = moe_layer(TINY)
    bias = moe.gate.e_score_correction_bias.clone()
    moe.to(torch.bfloat16)
    assert moe.gate.weight.dtype == torch.bfloat16
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(moe.gate.e_score_correction_bias, bias)


def test_segment_sum_after_inference_mode_supports_autograd():
    from twotower.layers.ssd import segment_sum

    with torch.inference_mode():
        segment_sum(torch.randn(2, 7))  # fills the mask cache inside inference mode
    with torch.enable_grad():
        x = torch.randn(2, 7, requires_grad=True)
        segment_sum(x).exp().sum().backward()
    assert x.grad is not None
