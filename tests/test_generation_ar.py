"""Tests for plain autoregressive generation: EOS handling, sampling, argument checks, streaming."""

from __future__ import annotations

import pytest
import torch

from twotower.generation import LENGTH, STOP, generate_ar, stream_ar

from tower_helpers import (  # noqa: F401 (inference_on_one_thread is an autouse fixture)
    TINY,
    build_model,
    inference_on_one_thread,
    random_ids,
)

PAD = 255  # a pad id that greedy decoding of these prompts does not produce on its own


@pytest.fixture(scope="module")
def model():
    return build_model(TINY, seed=0)


def first_new_token_at(row: list[int], step: int) -> int:
    """The token at ``step`` of ``row``, chosen so that it does not occur at an earlier step."""
    for index in range(step, len(row)):
        if row[index] not in row[:index]:
            return index
    raise AssertionError(f"no token first occurring at or after step {step} in {row}")


# ---------------------------------------------------------------------- EOS and finish reasons


def test_per_row_eos_stop_and_padding(model):
    prompts = random_ids(3, 10, seed=1)
    free = model.generate(prompts, max_new_tokens=30)[:, 10:].tolist()
    assert PAD not in sum(free, [])

    # EOS is the token row 0 first produces at step >= 6; each row then stops at its own first EOS.
    stop_step = first_new_token_at(free[0], 6)
    eos = free[0][stop_step]
    out = model.generate(prompts, max_new_tokens=30, eos_token_id=eos, pad_token_id=PAD, return_dict_in_generate=True)

    expected_rows, expected_reasons = [], []
    for row in free:
        if eos in row:
            end = row.index(eos) + 1
            expected_rows.append(row[:end])
            expected_reasons.append(STOP)
        else:
            expected_rows.append(row)
            expected_reasons.append(LENGTH)
    assert expected_reasons.count(LENGTH) >= 1, "the test needs a row that never produces EOS"

    assert out.finish_reasons == expected_reasons
    assert out.new_token_lists() == expected_rows
    width = out.new_tokens.shape[1]
    for row, expected in zip(out.new_tokens.tolist(), expected_rows):
        assert row[: len(expected)] == expected[:width]
        assert row[len(expected) :] == [PAD] * (width - len(expected))
    assert torch.equal(out.sequences[:, :10], prompts)
    assert out.stats.generated_tokens == sum(len(row) for row in expected_rows)


def test_all_rows_stopped_ends_early(model):
    prompt = random_ids(1, 10, seed=2)
    free = model.generate(prompt, max_new_tokens=30)[0, 10:].tolist()
    stop_step = first_new_token_at(free, 4)
    out = model.generate(prompt, max_new_tokens=30, eos_token_id=free[stop_step], return_dict_in_generate=True)
    assert out.finish_reasons == [STOP]
    assert out.new_tokens.shape == (1, stop_step + 1)
    assert out.new_tokens[0].tolist() == free[: stop_step + 1]
    assert out.stats.context_passes == stop_step


def test_eos_list_stops_at_any(model):
    prompt = random_ids(1, 10, seed=3)
    free = model.generate(prompt, max_new_tokens=30)[0, 10:].tolist()
    late = first_new_token_at(free, 12)
    early = first_new_token_at(free, 5)
    out = model.generate(prompt, max_new_tokens=30, eos_token_id=[free[late], free[early]], return_dict_in_generate=True)
    assert out.new_tokens[0].tolist() == free[: early + 1]


def test_no_eos_runs_to_length(model):
    out = model.generate(random_ids(2, 6, seed=4), max_new_tokens=7, return_dict_in_generate=True)
    assert out.finish_reasons == [LENGTH, LENGTH]
    assert out.new_tokens.shape == (2, 7)
    assert out.stats.generated_tokens == 14
    assert out.stats.prompt_tokens == 12


# ---------------------------------------------------------------------- sampling


def test_same_seed_same_tokens(model):
    prompt = random_ids(2, 8, seed=5)
    first = model.generate(prompt, max_new_tokens=32, do_sample=True, seed=11)
    second = model.generate(prompt, max_new_tokens=32, do_sample=True, seed=11)
    assert torch.equal(first, second)


def test_different_seed_different_tokens(model):
    prompt = random_ids(2, 8, seed=5)
    first = model.generate(prompt, max_new_tokens=32, do_sample=True, seed=11)
    other = model.generate(prompt, max_new_tokens=32, do_sample=True, seed=12)
    assert not torch.equal(first, other)


def test_generator_argument_matches_seed(model):
    prompt = random_ids(1, 8, seed=6)
    with_seed = model.generate(prompt, max_new_tokens=16, do_sample=True, seed=3)
    with_generator = model.generate(
        prompt, max_new_tokens=16, do_sample=True, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(with_seed, with_generator)


def test_sampling_differs_from_greedy(model):
    prompt = random_ids(2, 8, seed=7)
    greedy = model.generate(prompt, max_new_tokens=32)
    sampled = model.generate(prompt, max_new_tokens=32, do_sample=True, seed=1)
    assert not torch.equal(greedy, sampled)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 5.0])
def test_top_k_one_equals_greedy(model, temperature):
    prompt = random_ids(2, 8, seed=8)
    greedy = model.generate(prompt, max_new_tokens=24)
    top1 = model.generate(prompt, max_new_tokens=24, do_sample=True, top_k=1, temperature=temperature, seed=4)
    assert torch.equal(top1, greedy)


def test_zero_temperature_sampling_is_greedy(model):
    prompt = random_ids(2, 8, seed=9)
    greedy = model.generate(prompt, max_new_tokens=16)
    cold = model.generate(prompt, max_new_tokens=16, do_sample=True, temperature=0.0, seed=4)
    assert torch.equal(cold, greedy)


def test_suppressed_tokens_never_generated(model):
    prompt = random_ids(1, 8, seed=10)
    free = model.generate(prompt, max_new_tokens=16)[0, 8:].tolist()
    banned = sorted(set(free))[:3]
    out = model.generate(prompt, max_new_tokens=16, suppress_token_ids=banned)[0, 8:].tolist()
    assert not set(out) & set(banned)


# ---------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens=0 is invalid"),
        ({"max_new_tokens": -3}, "max_new_tokens=-3 is invalid"),
        ({"max_new_tokens": 2.0}, "max_new_tokens=2.0 is invalid"),
        ({"temperature": -0.5, "do_sample": True}, "temperature=-0.5 is invalid"),
        ({"top_p": 0.0, "do_sample": True}, "top_p=0.0 is invalid"),
        ({"top_p": 1.5, "do_sample": True}, "top_p=1.5 is invalid"),
        ({"top_p": -0.1, "do_sample": True}, "top_p=-0.1 is invalid"),
        ({"top_k": -1, "do_sample": True}, "top_k=-1 is invalid"),
        ({"seed": 1, "generator": torch.Generator()}, "either seed or generator"),
    ],
)
def test_bad_argument_raises(model, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        model.generate(random_ids(1, 4), **{"max_new_tokens": 4, **kwargs})


def test_top_p_one_accepted(model):
    out = model.generate(random_ids(1, 4), max_new_tokens=3, do_sample=True, top_p=1.0, seed=0)
    assert out.shape == (1, 7)


def test_empty_prompt_raises(model):
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)


def test_right_padding_raises(model):
    ids = random_ids(2, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="right padding is not supported"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4)


def test_all_padding_row_raises(model):
    ids = random_ids(2, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="a row with no tokens"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4)


def test_mask_shape_mismatch_raises(model):
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.generate(random_ids(2, 5), attention_mask=torch.ones(2, 4), max_new_tokens=4)


def test_out_of_vocabulary_id_raises(model):
    with pytest.raises(ValueError, match="outside"):
        model.generate(torch.tensor([[1, TINY.vocab_size]]), max_new_tokens=4)


def test_float_ids_raise(model):
    with pytest.raises(ValueError, match="integer torch.Tensor"):
        model.generate(torch.ones(1, 4), max_new_tokens=4)


def test_one_dimensional_prompt_accepted(model):
    prompt = random_ids(1, 6, seed=12)
    assert torch.equal(model.generate(prompt[0], max_new_tokens=5), model.generate(prompt, max_new_tokens=5))


# ---------------------------------------------------------------------- streaming


class RecordingStreamer:
    """A Hugging Face style streamer that records every ``put`` and ``end`` call."""

    def __init__(self):
        self.puts: list[list[int]] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        assert self.ended == 0, "put after end"
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended += 1


def test_streamer_gets_output_tokens(model):
    prompt = random_ids(1, 9, seed=13)
    streamer = RecordingStreamer()
    out = generate_ar(model, prompt, max_new_tokens=20, streamer=streamer)
    assert streamer.ended == 1
    assert streamer.puts[0] == prompt[0].tolist()
    streamed = sum(streamer.puts[1:], [])
    assert streamed == out[0, 9:].tolist()
    assert len(streamer.puts) == 1 + 20


def test_streamer_stops_at_eos(model):
    prompt = random_ids(1, 9, seed=14)
    free = model.generate(prompt, max_new_tokens=20)[0, 9:].tolist()
    stop_step = first_new_token_at(free, 3)
    streamer = RecordingStreamer()
    out = generate_ar(model, prompt, max_new_tokens=20, eos_token_id=free[stop_step], streamer=streamer,
                      return_dict_in_generate=True)
    assert sum(streamer.puts[1:], []) == out.new_token_lists()[0] == free[: stop_step + 1]
    assert streamer.ended == 1


def test_stream_ar_chunks_match_generate(model):
    prompts = random_ids(2, 7, seed=15)
    stream = stream_ar(model, prompts, max_new_tokens=12)
    chunks = []
    while True:
        try:
            chunks.append(next(stream))
        except StopIteration as stop:
            output = stop.value
            break
    assert len(chunks) == 12
    for row in range(2):
        streamed = sum((chunk.tokens[row] for chunk in chunks), [])
        assert streamed == output.new_tokens[row].tolist()
    assert torch.equal(output.sequences, model.generate(prompts, max_new_tokens=12))
