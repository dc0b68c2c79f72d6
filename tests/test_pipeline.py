"""TextPipeline: prompts, suppression, stop strings, cancellation and chat templates; StepView."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

from twotower.checkpoint import CheckpointError
from twotower.diffusion import DenoiseStep
from twotower.pipeline import CANCELLED, _RowState, load_pipeline
from twotower.trace import StepView, TraceRecorder, render_html


@pytest.fixture(scope="module")
def pipeline(chat_model_dir):
    return load_pipeline(chat_model_dir)


def test_encode_batch_left_pads(pipeline):
    input_ids, attention_mask = pipeline.encode_batch(["Shall I compare thee", "When"])
    long_ids = pipeline.encode("Shall I compare thee")
    short_ids = pipeline.encode("When")
    assert input_ids.shape == (2, len(long_ids))
    assert input_ids[0].tolist() == long_ids
    assert input_ids[1, -len(short_ids):].tolist() == short_ids
    assert input_ids[1, : len(long_ids) - len(short_ids)].eq(pipeline.pad_token_id).all()
    assert attention_mask[1].tolist() == [0] * (len(long_ids) - len(short_ids)) + [1] * len(short_ids)
    assert attention_mask[0].eq(1).all()


def test_empty_prompt_starts_from_bos(pipeline):
    assert pipeline.encode("") == [pipeline.bos_token_id]
    assert pipeline.encode([]) == [pipeline.bos_token_id]


def test_invalid_token_id_prompt(pipeline):
    with pytest.raises(ValueError, match="320"):
        pipeline.encode([5, 320])


def test_suppressed_ids(pipeline):
    assert pipeline.tokenizer_vocab_size == 300
    assert pipeline.suppressed_token_ids == [3, *range(300, 320)]


def test_defaults_from_generation_config(pipeline):
    settings = pipeline.settings()
    assert settings.block_size == 4
    assert settings.steps_per_block == 4
    assert settings.max_new_tokens == 16
    assert pipeline.settings("ar", max_new_tokens=3).max_new_tokens == 3
    with pytest.raises(ValueError, match="frobnicate"):
        pipeline.settings(frobnicate=1)
    with pytest.raises(ValueError, match="mode"):
        pipeline.settings("sideways")


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar", "ar"])
def test_batch_rows_match_single(pipeline, mode):
    prompts = ["Shall I compare thee", "When", "Look in thy glass"]
    batched = pipeline.generate(prompts, mode=mode, max_new_tokens=6)
    for index, prompt in enumerate(prompts):
        alone = pipeline.generate([prompt], mode=mode, max_new_tokens=6)[0]
        assert alone.token_ids == batched[index].token_ids
        assert alone.text == batched[index].text


def test_should_stop_cancels_mid_block(pipeline):
    passes = []
    results = pipeline.generate(["Shall I"], max_new_tokens=16, block_size=8, steps_per_block=8,
                                on_step=passes.append, should_stop=lambda: len(passes) >= 2)
    assert len(passes) == 2, "the loop must stop at the first pass after should_stop turns true"
    assert results[0].finish_reason == CANCELLED
    assert results[0].token_ids == []
    assert results[0].stats["stopped_early"] is True


class _CharDecoder:
    """Stands in for TextPipeline in _RowState: token id t decodes to chr(t)."""

    @staticmethod
    def decode(ids):
        return "".join(chr(t) for t in ids)


def test_stop_string_held_back_then_trimmed():
    row = _RowState(0, _CharDecoder(), ["cd"], eos_ids={0})
    first = row.add([ord("a"), ord("b"), ord("c")], finished=False)
    assert first.text == "ab", "'c' may start the stop string, so it is held back"
    assert first.finish_reason is None

    second = row.add([ord("d"), ord("e")], finished=False)
    assert second.text == ""
    assert second.finish_reason == "stop"
    assert row.text == "ab"
    assert row.token_ids == [ord("a"), ord("b"), ord("c"), ord("d")]

    assert row.add([ord("f")], finished=True) is None


def test_held_back_text_released_at_end():
    row = _RowState(0, _CharDecoder(), ["cd"], eos_ids={0})
    assert row.add([ord("a"), ord("c")], finished=False).text == "a"
    final = row.close("length")
    assert final.text == "c"
    assert final.finish_reason == "length"


def test_eos_finish_reason():
    row = _RowState(0, _CharDecoder(), [], eos_ids={2})
    delta = row.add([ord("a"), 2], finished=True)
    assert delta.finish_reason == "stop"
    row = _RowState(0, _CharDecoder(), [], eos_ids={2})
    assert row.add([ord("a")], finished=True).finish_reason == "length"


def test_chat_template_rendering(pipeline):
    text = pipeline.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<s><|system|>Be brief.\n<|user|>Hi\n<|assistant|>"


def test_missing_chat_template(model_dir):
    plain = load_pipeline(model_dir)
    assert plain.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_load_errors(tmp_path, model_dir):
    with pytest.raises(CheckpointError, match="not found"):
        load_pipeline(tmp_path / "absent")

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(model_dir, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_pipeline(no_tokenizer)

    bad_generation_config = tmp_path / "bad-generation-config"
    shutil.copytree(model_dir, bad_generation_config)
    (bad_generation_config / "generation_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="generation_config.json"):
        load_pipeline(bad_generation_config)


@pytest.mark.parametrize(
    "file_name, content, message",
    [
        ("generation_config.json", {"eos_token_id": [None]}, "eos_token_id"),
        ("generation_config.json", {"eos_token_id": "2"}, "eos_token_id"),
        ("generation_config.json", {"temperature": "hot"}, "temperature"),
        ("generation_config.json", {"block_size": 4.5}, "block_size"),
        ("generation_config.json", {"mode": "sideways"}, "mode"),
        ("tokenizer_config.json", ["not", "an", "object"], "JSON object"),
    ],
)
def test_invalid_config_file_values(tmp_path, model_dir, file_name, content, message):
    directory = tmp_path / "model"
    shutil.copytree(model_dir, directory)
    (directory / file_name).write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=message) as caught:
        load_pipeline(directory)
    assert file_name in str(caught.value)


def _step(block_index: int, step: int, tokens: list[int], committed: list[bool]) -> DenoiseStep:
    return DenoiseStep(block_index, step, [0], torch.tensor([tokens]), torch.tensor([committed]),
                       torch.tensor([[0.95, 0.6, 0.3, 0.1]]))


def test_step_view_ansi_redraws_block():
    out = io.StringIO()
    view = StepView(out, lambda t: f"t{t}", mask_token_id=3, ansi=True, width=200)
    view(_step(0, 0, [10, 3, 3, 3], [True, False, False, False]))
    first = out.getvalue()
    assert "\x1b[" in first
    assert first.count("\u2591") == 3, "three masked positions"
    view(_step(0, 1, [10, 11, 3, 3], [False, True, False, False]))
    second = out.getvalue()[len(first):]
    assert second.startswith("\x1b[1F\x1b[J"), "the block's one line is redrawn in place"
    view(_step(1, 0, [12, 3, 3, 3], [True, False, False, False]))
    third = out.getvalue()[len(first) + len(second):]
    assert not third.startswith("\x1b[1F"), "a new block starts on a new line"


def test_step_view_plain_lines():
    out = io.StringIO()
    view = StepView(out, lambda t: f"t{t}", mask_token_id=3, ansi=False)
    view(_step(0, 0, [10, 3, 3, 3], [True, False, False, False]))
    assert out.getvalue() == "prompt 0 block 0 step 0: +1 conf 0.95 | [t10]\u2591\u2591\u2591\n"


def test_trace_escapes_script_end():
    recorder = TraceRecorder(lambda t: "</script><b>")
    recorder.begin_batch(["</script>"])
    recorder(_step(0, 0, [10, 3, 3, 3], [True, False, False, False]))
    page = render_html(recorder)
    assert page.count("</script>") == 2, "only the page's own two script elements end"
    data = page.split('id="trace-data">', 1)[1].split("</script>", 1)[0]
    assert json.loads(data)["vocab"]["10"] == "</script><b>"
