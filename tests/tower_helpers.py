"""Tiny configs, seeded models and a transformers oracle shared by the tower tests.

The configs use ``initializer_range=0.1`` (not 0.02), so logits spread over a few units and greedy
decoding picks varied tokens. With 0.02 a random tiny model keeps repeating a few ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from twotower.config import NemotronHConfig
from twotower.layers.moe import TopKRouter
from twotower.model import NemotronHForCausalLM


@pytest.fixture(autouse=True)
def inference_on_one_thread():
    """Run each test without autograd and on one intra-op thread, restoring both afterwards.

    Models this small gain nothing from intra-op threads. On a 2-core machine shared with other
    jobs, two OpenMP threads waiting on each other slowed one tiny forward from 20 ms to 2 s.
    Test modules import this fixture to enable it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)

# Layers "ME*-M*E" cover all four layer types. The 8 experts form 2 groups, and routing keeps both.
TINY = NemotronHConfig.tiny(initializer_range=0.1)
# 4 expert groups of which routing keeps 2, so group selection drops experts. moe_latent_size adds the
# latent projections around the routed experts.
LATENT = NemotronHConfig.tiny(initializer_range=0.1, n_group=4, topk_group=2, moe_latent_size=24)
CONFIGS = {"tiny": TINY, "latent": LATENT}


def build_model(config: NemotronHConfig = TINY, seed: int = 0) -> NemotronHForCausalLM:
    """A seeded random fp32 model in eval mode, with nonzero router correction biases."""
    model = NemotronHForCausalLM.from_config(config, seed=seed).eval()
    randomize_router_bias(model, seed)
    return model


@torch.no_grad()
def randomize_router_bias(model: torch.nn.Module, seed: int) -> None:
    # Initialisation zeroes the bias, which would leave its effect on expert selection untested.
    generator = torch.Generator().manual_seed(seed + 1000)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)


def random_ids(batch: int, length: int, seed: int = 0, vocab_size: int = TINY.vocab_size) -> torch.Tensor:
    """Token ids drawn from ``[4, vocab_size)``, so that no prompt token is pad, BOS, EOS or mask."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (batch, length), generator=generator)


def routers(model: torch.nn.Module) -> list[TopKRouter]:
    return [module for module in model.modules() if isinstance(module, TopKRouter)]


def transformers_config(config: NemotronHConfig):
    """The same hyperparameters as a ``transformers.NemotronHConfig`` (which has no mask token)."""
    import transformers

    fields = {key: value for key, value in config.to_dict().items() if key != "mask_token_id"}
    return transformers.NemotronHConfig(**fields)


def save_transformers_checkpoint(config: NemotronHConfig, directory: Path, seed: int = 0):
    """Build transformers' ``NemotronHForCausalLM``, save it with its own ``save_pretrained``, return it."""
    import transformers

    torch.manual_seed(seed)
    reference = transformers.NemotronHForCausalLM(transformers_config(config)).eval()
    randomize_router_bias(reference, seed)
    reference.save_pretrained(directory)
    return reference
