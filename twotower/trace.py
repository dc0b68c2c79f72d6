"""Denoising traces: record every mask-diffusion pass and render it as a self-contained HTML page.

``TraceRecorder`` is an ``on_step`` hook for ``stream_mask_diffusion`` (or ``TextPipeline``). For each
prompt row it keeps, block by block, the step at which each position was committed, the token and
the confidence of its prediction at that step, plus every position's confidence at every step.
``render_html`` writes one page with inline CSS and JavaScript: a step slider with play/pause that
replays the blocks resolving, and a static list of all committed tokens coloured by confidence.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BlockTrace:
    """One block of one row: per position the commit step, token id and confidence at commit."""

    index: int
    size: int
    commit_step: list[int | None] = field(default_factory=list)
    token: list[int | None] = field(default_factory=list)
    confidence: list[float | None] = field(default_factory=list)
    step_confidence: list[list[float]] = field(default_factory=list)  # [step][position]

    def __post_init__(self) -> None:
        self.commit_step = [None] * self.size
        self.token = [None] * self.size
        self.confidence = [None] * self.size


class TraceRecorder:
    """Collect ``DenoiseStep`` events of one or more batches, keyed by prompt row."""

    def __init__(self, token_text: Callable[[int], str]):
        self.token_text = token_text
        self.prompts: list[str] = []
        self.rows: list[list[BlockTrace]] = []
        self._offset = 0

    def begin_batch(self, prompts: Sequence[str]) -> None:
        """Start a new batch; its row r is stored as prompt ``previous prompts + r``."""
        self._offset = len(self.prompts)
        self.prompts.extend(prompts)
        self.rows.extend([] for _ in prompts)

    def __call__(self, event: Any) -> None:
        tokens = event.block.tolist()
        committed = event.committed_now.tolist()
        confidence = event.confidence.float().tolist()
        for active_index, row in enumerate(event.rows):
            blocks = self.rows[self._offset + row]
            if not blocks or blocks[-1].index != event.block_index:
                blocks.append(BlockTrace(event.block_index, len(tokens[active_index])))
            block = blocks[-1]
            block.step_confidence.append([round(c, 4) for c in confidence[active_index]])
            for position, is_new in enumerate(committed[active_index]):
                if is_new:
                    block.commit_step[position] = event.step
                    block.token[position] = tokens[active_index][position]
                    block.confidence[position] = round(confidence[active_index][position], 4)

    def committed_tokens(self, row: int) -> list[int]:
        """Return the committed token ids of ``row`` in output order."""
        return [t for block in self.rows[row] for t in block.token if t is not None]

    def as_dict(self) -> dict[str, Any]:
        ids = {t for blocks in self.rows for block in blocks for t in block.token if t is not None}
        return {
            "prompts": self.prompts,
            "vocab": {str(i): _visible(self.token_text(i)) for i in sorted(ids)},  # display text
            "rows": [
                [
                    {
                        "index": b.index,
                        "commit_step": b.commit_step,
                        "token": b.token,
                        "confidence": b.confidence,
                        "step_confidence": b.step_confidence,
                    }
                    for b in blocks
                ]
                for blocks in self.rows
            ],
        }


def confidence_colour(confidence: float) -> str:
    """Background colour for a confidence in [0, 1]: red (0) through yellow to green (1)."""
    hue = round(120 * max(0.0, min(1.0, confidence)))
    return f"hsl({hue}, 75%, 78%)"


def _static_tokens(recorder: TraceRecorder, row: int) -> str:
    spans = []
    for block in recorder.rows[row]:
        for position, token in enumerate(block.token):
            if token is None:
                continue
            confidence = block.confidence[position]
            title = f"block {block.index}, step {block.commit_step[position]}, position {position}, confidence {confidence:.3f}"
            spans.append(
                f'<span class="tok" style="background:{confidence_colour(confidence)}" title="{html.escape(title)}">'
                f"{html.escape(_visible(recorder.token_text(token)))}</span>"
            )
        spans.append('<span class="sep"></span>')
    return "".join(spans)


def _visible(text: str) -> str:
    """Token text with spaces, newlines and other invisible characters made visible."""
    if not text:
        return "\u2205"
    shown = []
    for char in text:
        if char == " ":
            shown.append("\u00b7")
        elif char == "\n":
            shown.append("\u21b5")
        elif not char.isprintable():
            shown.append(f"\\x{ord(char):02x}" if ord(char) < 256 else f"\\u{ord(char):04x}")
        else:
            shown.append(char)
    return "".join(shown)


def render_html(recorder: TraceRecorder, title: str = "twotower denoising trace") -> str:
    """Return the trace as one HTML page (no external assets)."""
    # "<" is escaped so no token text can close the script element.
    data = json.dumps(recorder.as_dict(), ensure_ascii=False).replace("<", "\\u003c")
    static = "\n".join(
        f'<section class="static"><h3>Prompt {row}: {html.escape(prompt)}</h3>'
        f'<div class="tokens">{_static_tokens(recorder, row)}</div></section>'
        for row, prompt in enumerate(recorder.prompts)
    )
    # One pass, so placeholder names inside prompts or tokens are never substituted.
    values = {"__TITLE__": html.escape(title), "__DATA__": data, "__STATIC__": static}
    return re.sub("__TITLE__|__DATA__|__STATIC__", lambda match: values[match.group(0)], _PAGE)


def write_html(recorder: TraceRecorder, path: str | Path, title: str = "twotower denoising trace") -> Path:
    path = Path(path)
    path.write_text(render_html(recorder, title), encoding="utf-8")
    return path



class StepView:
    """A live terminal view of mask diffusion, used as an ``on_step`` hook.

    With ``ansi`` (for a TTY) each row's current block is redrawn in place after every pass:
    committed tokens coloured by the confidence they were committed with (red below 0.5, yellow
    below 0.8, else green), tokens committed in this pass underlined, masked positions shown as
    ``placeholder``. Without ``ansi`` every pass prints one plain line per row, with the tokens
    committed in that pass in brackets.
    """

    def __init__(self, stream, token_text: Callable[[int], str], mask_token_id: int, ansi: bool,
                 width: int = 80, placeholder: str = "\u2591"):
        self.stream = stream
        self.token_text = token_text
        self.mask_token_id = mask_token_id
        self.ansi = ansi
        self.width = max(20, width)
        self.placeholder = placeholder
        self.offset = 0
        self._drawn_lines = 0
        self._block: int | None = None
        self._commit_confidence: dict[tuple[int, int], float] = {}

    def begin_batch(self, offset: int) -> None:
        """Number the rows of the next batch from ``offset`` (the prompt index of its first row)."""
        self.offset = offset
        self._drawn_lines = 0
        self._block = None

    def __call__(self, event: Any) -> None:
        if event.block_index != self._block:
            self._commit_confidence.clear()
        tokens = event.block.tolist()
        committed = event.committed_now.tolist()
        confidence = event.confidence.float().tolist()
        lines = []
        for i, row in enumerate(event.rows):
            new = []
            for position, is_new in enumerate(committed[i]):
                if is_new:
                    self._commit_confidence[row, position] = confidence[i][position]
                    new.append(confidence[i][position])
            summary = f"+{len(new)} conf " + " ".join(f"{c:.2f}" for c in new) if new else "+0"
            header = f"prompt {self.offset + row} block {event.block_index} step {event.step}: {summary} | "
            cells = [
                self._cell(token, self._commit_confidence.get((row, position), 0.0), committed[i][position])
                for position, token in enumerate(tokens[i])
            ]
            lines.append(header + "".join(cells))

        if not self.ansi:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
            return
        if self._block == event.block_index and self._drawn_lines:
            # Move to the start of this block's lines and clear them before redrawing.
            self.stream.write(f"\x1b[{self._drawn_lines}F\x1b[J")
        self._block = event.block_index
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn_lines = sum(self._screen_lines(line) for line in lines)

    def _cell(self, token: int, confidence: float, is_new: bool) -> str:
        # The block holds the mask id at masked positions and the committed token elsewhere.
        if token == self.mask_token_id:
            return f"\x1b[2m{self.placeholder}\x1b[0m" if self.ansi else self.placeholder
        text = _visible(self.token_text(token))
        if not self.ansi:
            return f"[{text}]" if is_new else text
        colour = 46  # green
        if confidence < 0.5:
            colour = 196  # red
        elif confidence < 0.8:
            colour = 226  # yellow
        style = "4;1;" if is_new else ""
        return f"\x1b[{style}38;5;{colour}m{text}\x1b[0m"

    def _screen_lines(self, line: str) -> int:
        visible = len(_ANSI_ESCAPE.sub("", line))
        return max(1, -(-visible // self.width))


_ANSI_ESCAPE = re.compile("\x1b\\[[0-9;]*[A-Za-z]")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.controls { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; margin-bottom: 1em; }
#slider { width: 40em; max-width: 90vw; }
.block { display: flex; gap: 2px; margin: 3px 0; align-items: center; }
.label { width: 5.5em; color: #666; font-size: 0.85em; }
.cell { font-family: ui-monospace, monospace; min-width: 2.2em; padding: 2px 4px; border-radius: 3px;
        text-align: center; white-space: pre; border: 2px solid transparent; }
.masked { background: #e4e4e4; color: #999; }
.new { border-color: #000; }
.tok { font-family: ui-monospace, monospace; white-space: pre; padding: 1px 2px; margin: 1px; border-radius: 3px; }
.sep { display: inline-block; width: 0.6em; }
.legend span { padding: 2px 6px; font-size: 0.85em; }
.tokens { line-height: 1.9; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<p>Each row of cells is one block of the output. A grey cell is still masked and shows the
confidence of its current prediction; a coloured cell shows a committed token, coloured by the
confidence of its prediction when it was committed. Black borders mark the positions committed at
the selected step. Hover a cell for details.</p>
<div class="legend" id="legend"></div>
<div class="controls">
  <label>Prompt <select id="row"></select></label>
  <button id="play" type="button">Play</button>
  <input id="slider" type="range" min="0" max="0" value="0">
  <span id="where"></span>
</div>
<div id="view"></div>
<h2>Committed tokens</h2>
__STATIC__
<script type="application/json" id="trace-data">__DATA__</script>
<script>
(function () {
  const trace = JSON.parse(document.getElementById("trace-data").textContent);
  const rowSelect = document.getElementById("row");
  const slider = document.getElementById("slider");
  const where = document.getElementById("where");
  const view = document.getElementById("view");
  const play = document.getElementById("play");
  let timeline = [];
  let timer = null;

  function colour(c) { return "hsl(" + Math.round(120 * Math.max(0, Math.min(1, c))) + ", 75%, 78%)"; }

  const legend = document.getElementById("legend");
  legend.append("Confidence: ");
  [0, 0.25, 0.5, 0.75, 1].forEach(function (c) {
    const span = document.createElement("span");
    span.style.background = colour(c);
    span.textContent = c.toFixed(2);
    legend.append(span);
  });

  trace.prompts.forEach(function (prompt, i) {
    const option = document.createElement("option");
    option.value = i;
    option.textContent = i + ": " + prompt.slice(0, 60);
    rowSelect.append(option);
  });

  function buildTimeline() {
    timeline = [];
    trace.rows[rowSelect.value].forEach(function (block, b) {
      for (let s = 0; s < block.step_confidence.length; s++) timeline.push([b, s]);
    });
    slider.max = Math.max(0, timeline.length - 1);
    slider.value = slider.max;
  }

  function render() {
    const blocks = trace.rows[rowSelect.value];
    view.innerHTML = "";
    if (!timeline.length) { where.textContent = "no denoiser steps recorded"; return; }
    const [current, step] = timeline[slider.value];
    where.textContent = "block " + blocks[current].index + ", step " + step +
      " (" + (Number(slider.value) + 1) + " of " + timeline.length + " passes)";
    for (let b = 0; b <= current; b++) {
      const block = blocks[b];
      const line = document.createElement("div");
      line.className = "block";
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = "block " + block.index;
      line.append(label);
      const shownStep = b < current ? Infinity : step;
      block.token.forEach(function (token, p) {
        const cell = document.createElement("span");
        cell.className = "cell";
        const committedAt = block.commit_step[p];
        if (committedAt !== null && committedAt <= shownStep) {
          cell.textContent = trace.vocab[token];
          cell.style.background = colour(block.confidence[p]);
          if (b === current && committedAt === step) cell.classList.add("new");
          cell.title = "token " + token + ", committed at step " + committedAt +
            ", confidence " + block.confidence[p].toFixed(3);
        } else {
          const c = block.step_confidence[Math.min(step, block.step_confidence.length - 1)][p];
          cell.classList.add("masked");
          cell.textContent = c.toFixed(2);
          cell.title = "masked; current prediction confidence " + c.toFixed(3);
        }
        line.append(cell);
      });
      view.append(line);
    }
  }

  function stop() { clearInterval(timer); timer = null; play.textContent = "Play"; }
  play.addEventListener("click", function () {
    if (timer) { stop(); return; }
    if (Number(slider.value) >= timeline.length - 1) slider.value = 0;
    play.textContent = "Pause";
    timer = setInterval(function () {
      if (Number(slider.value) >= timeline.length - 1) { stop(); return; }
      slider.value = Number(slider.value) + 1;
      render();
    }, 350);
  });
  slider.addEventListener("input", function () { stop(); render(); });
  rowSelect.addEventListener("change", function () { stop(); buildTimeline(); render(); });
  buildTimeline();
  render();
})();
</script>
</body>
</html>
"""
