"""Files that let transformers load a two-tower checkpoint with ``trust_remote_code=True``.

``install_remote_code(directory)`` copies ``configuration_twotower.py`` and ``modeling_twotower.py``
into a checkpoint directory and returns the ``config.json`` keys that point transformers' auto
classes at them. ``TwoTowerForCausalLM.save_pretrained`` calls it, after which

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.bfloat16)

returns a ``PreTrainedModel`` whose weights, logits and generation methods are those of
``TwoTowerForCausalLM.from_pretrained(directory)``. The model file needs the ``twotower`` package at
load time; it raises ``ImportError`` with the install command when the package is missing.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

CONFIG_FILE = "configuration_twotower.py"
MODELING_FILE = "modeling_twotower.py"
MODEL_TYPE = "twotower_nemotron_h"  # not "nemotron_h": transformers would merge the per-expert tensors on load
CONFIG_CLASS = "TwoTowerNemotronHConfig"
MODEL_CLASS = "TwoTowerNemotronHForCausalLM"

_SOURCE_DIR = Path(__file__).resolve().parent


def remote_code_files() -> list[Path]:
    """Return the paths of the files that ``install_remote_code`` copies."""
    return [_SOURCE_DIR / CONFIG_FILE, _SOURCE_DIR / MODELING_FILE]


def config_entries() -> dict[str, Any]:
    """Return the ``config.json`` keys that route transformers' auto classes to the copied files."""
    config_ref = f"{Path(CONFIG_FILE).stem}.{CONFIG_CLASS}"
    model_ref = f"{Path(MODELING_FILE).stem}.{MODEL_CLASS}"
    return {
        "model_type": MODEL_TYPE,
        "auto_map": {
            "AutoConfig": config_ref,
            "AutoModel": model_ref,
            "AutoModelForCausalLM": model_ref,
        },
    }


def install_remote_code(directory: str | Path) -> dict[str, Any]:
    """Copy the remote-code files into ``directory`` (created if missing) and return the config keys."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for source in remote_code_files():
        if not source.is_file():
            raise FileNotFoundError(
                f"remote-code file {source} is missing from the installed twotower package; reinstall twotower"
            )
        shutil.copyfile(source, directory / source.name)
    return config_entries()
