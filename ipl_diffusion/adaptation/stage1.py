"""What both backends do around Stage 1 (Eq. 6): keep its result, report it, feed Stage 2.

Stage 1's result is saved one way for both backends: ``output_dir/stage1/`` holds the
:class:`~ipl_diffusion.prompt_learning.PromptLearner` (``prompt_learner.json``, ``history.csv``,
``prompt_module/`` in safetensors) plus ``options.json``, the options it was made with. A
resumed run reuses it only when those options are the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ipl_diffusion.configs import Stage1Config, as_dict
from ipl_diffusion.outputs import atomic_write_text

STAGE1_DIR = "stage1"
# Held-out share of a fixed Stage-1 pool for the retrieval diagnostic: a fifth, at most 256
# images, and none when that would be fewer than 8 (retrieval among so few says little).
MAX_HELDOUT, MIN_HELDOUT = 256, 8
RETRIEVAL_BATCH = 32  # prompt_retrieval's batch: chance is 1 / min(32, held-out count)


def heldout_size(pool_size: int) -> int:
    """How many of ``pool_size`` Stage-1 images are held out for ``prompt_retrieval``."""
    k = min(MAX_HELDOUT, pool_size // 5)
    return k if k >= MIN_HELDOUT else 0


def stage1_report(learner, train_images: int | None, heldout_images: int) -> dict:
    """What ``run_config.json["stage1"]`` records of Stage 1's result: pool sizes, held-out
    prompt retrieval and its chance level (``None`` without held-out images)."""
    return {
        "pool_images": train_images,
        "heldout_images": heldout_images,
        "heldout_retrieval": getattr(learner, "heldout_retrieval", None),
        "retrieval_chance": 1 / min(RETRIEVAL_BATCH, heldout_images) if heldout_images else None,
    }


def _canonical(key: dict) -> dict:
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def _with_stage1_defaults(saved: dict) -> dict:
    """A saved key with every Stage-1 option it predates set to that option's default (what
    the run used then), so a result saved before an option existed is still reused."""
    if isinstance(saved.get("stage1"), dict):
        saved = dict(saved, stage1={**_canonical(as_dict(Stage1Config())), **saved["stage1"]})
    return saved


def save_stage1(output_dir, key: dict, learner) -> None:
    """Keep Stage 1's result in ``output_dir/stage1`` (main process; no-op without a folder)."""
    if output_dir is None:
        return
    folder = Path(output_dir) / STAGE1_DIR
    learner.save_pretrained(folder)
    atomic_write_text(folder / "options.json", json.dumps(_canonical(key), sort_keys=True))


def load_stage1(output_dir, key: dict, encoder):
    """The saved Stage-1 result when it was made with exactly the options ``key``, else None."""
    from ipl_diffusion.prompt_learning import PromptLearner

    if output_dir is None:
        return None
    folder = Path(output_dir) / STAGE1_DIR
    options = folder / "options.json"
    if not options.is_file() or _with_stage1_defaults(json.loads(options.read_text())) != _canonical(key):
        return None
    learner = PromptLearner.from_pretrained(str(folder), encoder)
    learner.prompt_module.to(encoder.device)
    return learner


@torch.no_grad()
def prompt_text_features(learner, latents: torch.Tensor, source: str, target: str, batch_size: int = 64):
    """``(source (N, D), target (N, D))`` float32 per-image prompt features of Stage 1's
    result for ``latents (N, latent_dim)`` -- the two terms of ΔT_i in Eq. 8."""
    chunks = range(0, len(latents), batch_size)
    src = torch.cat([learner.text_features(latents[i : i + batch_size], source) for i in chunks])
    tgt = torch.cat([learner.text_features(latents[i : i + batch_size], target) for i in chunks])
    return src.float(), tgt.float()
