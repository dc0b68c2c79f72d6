"""Mask-diffusion bookkeeping on a scripted fake denoiser: commit counts, fixed commits, block ends."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from twotower.diffusion import commit_counts, generate_mask_diffusion, select_commits

VOCAB = 32
MASK = 3


def gather_positions(logits: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Return the logits (B, S, V) at ``positions`` (B, K), as the real denoiser's head does."""
    if positions is None:
        return logits
    return logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))


class FakeCache:
    def __init__(self, batch):
        self.length = 0
        self.batch = batch

    def select_rows(self, rows):
        self.batch = len(rows)
        return self


class ScriptedDenoiser:
    """Returns seeded random logits with a strong mask-token logit, and records what it was given."""

    def __init__(self, seed: int = 0, sharpness: float = 4.0):
        self.config = SimpleNamespace(vocab_size=VOCAB, mask_token_id=MASK, pad_token_id=0)
        self.context_device = self.denoiser_device = torch.device("cpu")
        self.generator = torch.Generator().manual_seed(seed)
        self.sharpness = sharpness
        self.calls = []  # (block, t, logits)
        self.extensions = []

    def new_cache(self, batch, capacity=0, track_previous=False):
        return FakeCache(batch)

    def extend_context(self, ids, cache, attention_mask=None):
        self.extensions.append(ids.clone())
        cache.length += ids.shape[1]

    def prepare_context(self, cache, block_size, context_length=None, mamba_states=None):
        return cache

    def denoise(self, block, context, t, positions=None):
        logits = torch.randn(*block.shape, VOCAB, generator=self.generator) * self.sharpness
        logits[..., MASK] = 50.0  # must be ignored by the sampler
        self.calls.append((block.clone(), t.clone(), logits.clone()))
        return gather_positions(logits, positions)


def expected_count(confidences: list[float], threshold: float, step: int, steps: int) -> int:
    """The commit rule, written independently with plain Python numbers."""
    masked = len(confidences)
    if masked == 0:
        return 0
    above = sum(1 for c in confidences if c > threshold)
    k = max(above, 1)
    k = max(k, math.ceil(masked / (steps - step)))
    return min(k, masked)


CASES = [(th, steps, size) for th in (0.0, 0.5, 1.0) for steps in (1, 4, 16, 32) for size in (1, 5, 16)]


@pytest.mark.parametrize("threshold, steps, block_size", CASES)
def test_commit_bookkeeping(threshold, steps, block_size):
    fake = ScriptedDenoiser(seed=steps * 100 + block_size, sharpness=6.0 if threshold else 1.0)
    trace = []
    ids = torch.randint(4, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    max_new = 2 * block_size
    out = generate_mask_diffusion(
        fake, ids, max_new_tokens=max_new, block_size=block_size, steps_per_block=steps,
        mask_token_id=MASK, confidence_threshold=threshold, return_dict_in_generate=True, on_step=trace.append,
    )

    # Every block finishes within steps_per_block passes; no mask token is ever emitted.
    assert all(p <= steps for p in out.stats.passes_per_block)
    assert len(out.stats.passes_per_block) == 2
    assert not (out.new_tokens == MASK).any()
    if threshold == 1.0:
        # Confidence never exceeds 1, so the floor alone decides: exactly min(steps, S) passes.
        assert out.stats.passes_per_block == [min(steps, block_size)] * 2

    for call, event in zip(fake.calls, trace):
        block_before, t, logits = call
        masked_before = block_before == MASK
        # t is each row's masked fraction of the block.
        assert torch.allclose(t, masked_before.float().mean(-1))
        probs = logits.clone()
        probs[..., MASK] = float("-inf")
        probs = probs.softmax(-1)
        confidence = probs.max(-1).values
        for row in range(block_before.shape[0]):
            masked_conf = confidence[row][masked_before[row]].tolist()
            want = expected_count(masked_conf, threshold, event.step, steps)
            got = int(event.committed_now[row].sum())
            assert got == want, (row, event.step)
            # Committed positions were masked, and the most confident among the masked.
            committed = event.committed_now[row]
            assert not (committed & ~masked_before[row]).any()
            if 0 < got < len(masked_conf):
                lowest_taken = confidence[row][committed].min()
                highest_left = confidence[row][masked_before[row] & ~committed].max()
                assert lowest_taken >= highest_left
        # Committed tokens never change afterwards.
        kept = ~masked_before
        assert torch.equal(event.block[kept], block_before[kept])
        assert not (event.block[event.committed_now] == MASK).any()


def test_commit_counts_rule_table():
    conf = torch.tensor([[0.9, 0.8, 0.1, 0.05]])
    masked = torch.tensor([[True, True, True, False]])
    assert commit_counts(conf, masked, 0.5, step=0, steps=16).tolist() == [2]
    assert commit_counts(conf, masked, 0.95, step=0, steps=16).tolist() == [1]  # at least one
    assert commit_counts(conf, masked, 0.95, step=0, steps=2).tolist() == [2]  # ceil(3 / 2)
    assert commit_counts(conf, masked, 0.95, step=15, steps=16).tolist() == [3]  # last step: all
    assert commit_counts(conf, masked, 0.0, step=0, steps=16).tolist() == [3]  # capped at masked
    none_left = torch.zeros_like(masked)
    assert commit_counts(conf, none_left, 0.5, step=0, steps=4).tolist() == [0]


def test_select_commits_takes_most_confident_masked():
    conf = torch.tensor([[0.2, 0.99, 0.7, 0.5], [0.1, 0.2, 0.3, 0.4]])
    masked = torch.tensor([[True, False, True, True], [True, True, True, True]])
    chosen = select_commits(conf, masked, torch.tensor([2, 1]))
    assert chosen.tolist() == [[False, False, True, True], [False, False, False, True]]


def test_context_extended_once_per_block_with_committed_tokens():
    fake = ScriptedDenoiser(seed=1)
    ids = torch.randint(4, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    out = generate_mask_diffusion(fake, ids, max_new_tokens=12, block_size=5, steps_per_block=4, mask_token_id=MASK,
                                  return_dict_in_generate=True)
    # Prompt, then every block but the last (nothing reads the context after it).
    assert [e.shape[1] for e in fake.extensions] == [4, 5, 5]
    assert torch.equal(torch.cat(fake.extensions[1:], dim=1)[0], out.new_tokens[0, :10])


class RowContext:
    """A fake prepared context that remembers which rows are confident, and follows row selection."""

    def __init__(self, confident: torch.Tensor):
        self.confident = confident

    def select_rows(self, rows):
        return RowContext(self.confident[rows])


class RowDenoiser(ScriptedDenoiser):
    """Sure of token 7 everywhere for prompts that start with token 4, and unsure for the others."""

    def __init__(self):
        super().__init__()
        self.positions = []  # the positions argument of each call

    def extend_context(self, ids, cache, attention_mask=None):
        if cache.length == 0:
            self.confident = ids[:, 0] == 4
        super().extend_context(ids, cache, attention_mask)

    def prepare_context(self, cache, block_size, context_length=None, mamba_states=None):
        return RowContext(self.confident)

    def denoise(self, block, context, t, positions=None):
        logits = torch.zeros(*block.shape, VOCAB)
        logits[context.confident, :, 7] = 20.0
        self.calls.append((block.clone(), t.clone(), logits.clone()))
        self.positions.append(None if positions is None else positions.clone())
        return gather_positions(logits, positions)


def test_finished_rows_leave_the_block():
    fake = RowDenoiser()
    ids = torch.tensor([[4, 5, 6], [9, 5, 6]])  # row 0 confident, row 1 unsure
    trace = []
    out = generate_mask_diffusion(
        fake, ids, max_new_tokens=8, block_size=4, steps_per_block=4, mask_token_id=MASK,
        confidence_threshold=0.9, return_dict_in_generate=True, on_step=trace.append,
    )

    # Row 0 commits its block in one pass; row 1 takes four, and runs alone after the first.
    assert [call[0].shape[0] for call in fake.calls] == [2, 1, 1, 1] * 2
    assert [event.rows for event in trace] == [[0, 1], [1], [1], [1]] * 2
    assert out.stats.passes_per_block == [4, 4]
    assert out.stats.row_passes == 10
    assert out.new_tokens[0].tolist() == [7] * 8
    assert not (out.new_tokens[1] == MASK).any()


def test_head_reads_only_masked_positions():
    fake = RowDenoiser()
    generate_mask_diffusion(
        fake, torch.tensor([[9, 5, 6]]), max_new_tokens=4, block_size=4, steps_per_block=4, mask_token_id=MASK,
        confidence_threshold=0.9,
    )

    # The unsure row commits one position per pass, so the head reads 4, then 3, 2 and 1 positions.
    assert fake.positions[0] is None
    for call, positions in zip(fake.calls[1:], fake.positions[1:]):
        masked = (call[0] == MASK).nonzero()[:, 1]
        assert sorted(positions[0].tolist()) == masked.tolist()
    assert [p.shape[1] for p in fake.positions[1:]] == [3, 2, 1]
