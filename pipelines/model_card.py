"""Model cards (``README.md``) of adapted pipelines, through ``huggingface_hub.ModelCard``.

A card carries the Hub metadata (``ModelCardData``: library, license, tags, base model), the
domains, a link to the project (:func:`ipl_diffusion.pipelines.hub_layout.project_url`), the run's sample
grid, the run's numbers (Stage 2 loss and time from its history, every option of
``config.adaptation``) and a usage snippet that loads the repository with plain diffusers.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ipl_diffusion.configs import TRAINED_SCHEMES
from ipl_diffusion.pipelines.adapted_pipeline import SAMPLE_GRID_NAME
from ipl_diffusion.pipelines.hub_layout import INSTALL_HINT, project_url


def summarize_history(history: Sequence[dict]) -> Optional[dict]:
    """The run's numbers kept in ``config.run_summary``: Stage 2 iterations, the first loss,
    the mean loss of the last (up to) 10 iterations, and the total seconds when the trainer
    timed its steps. ``None`` for an empty history (e.g. a run resumed at its last step)."""
    losses = [float(record["loss"]) for record in history if "loss" in record]
    if not losses:
        return None
    tail = losses[-10:]
    summary = {
        "stage2_iterations": len(losses),
        "stage2_loss_first": round(losses[0], 6),
        "stage2_loss_final": round(sum(tail) / len(tail), 6),
    }
    seconds = [float(record["seconds"]) for record in history if "seconds" in record]
    if seconds:
        summary["stage2_seconds"] = round(sum(seconds), 2)
    return summary


def _hub_base_model(base_model: Optional[str]) -> Optional[str]:
    """``base_model`` for the card's metadata only when it is a Hub id (``owner/name``, by
    ``huggingface_hub``'s own rules): the Hub rejects other values there, e.g. the local folder
    a model was built from. The card's text names it either way."""
    if not base_model or os.path.exists(base_model) or base_model.count("/") != 1:
        return None
    try:
        validate_repo_id(base_model)
    except HFValidationError:
        return None
    return base_model


def _options_table(config: dict) -> list[str]:
    rows = []
    for key in sorted(config):
        if isinstance(config[key], dict):
            rows += [f"| {key} | `{name}` | `{value}` |" for name, value in sorted(config[key].items())]
        elif key not in ("source", "target"):
            rows.append(f"| run | `{key}` | `{config[key]}` |")
    return ["| part | option | value |", "|---|---|---|", *rows] if rows else []


def _numbers(summary: Optional[dict]) -> list[str]:
    if not summary:
        return []
    lines = [
        f"* Stage 2: {summary['stage2_iterations']} iterations, loss {summary['stage2_loss_first']:.4f} at the first "
        f"and {summary['stage2_loss_final']:.4f} over the last {min(10, summary['stage2_iterations'])}"
    ]
    if "stage2_seconds" in summary:
        lines.append(f"* Stage 2 time: {summary['stage2_seconds']:.1f} s")
    return lines + [""]


def build_model_card(
    pipe,
    repo_id: str,
    title: str,
    description: str,
    tags: Sequence[str],
    grid_caption: str,
    usage: str,
    pipeline_tag: Optional[str] = None,
) -> ModelCard:
    """The card of an adapted pipeline (``IPLPipeline`` / ``StyleGANIPLPipeline``).

    Args:
        pipe: the pipeline; reads ``config`` (labels, ``base_model``, ``adaptation``,
            ``run_summary``) and ``sample_grid``.
        repo_id: Hub id (or local folder) the usage snippet loads.
        title / description: Markdown heading text and first paragraph.
        tags, pipeline_tag: Hub metadata.
        grid_caption: one sentence on the grid's rows.
        usage: Python code of the usage snippet (no fences).
    """
    url = project_url()
    project = f"[ipl-diffusion]({url})" if url else "ipl-diffusion"
    config, adaptation = pipe.config, dict(pipe.config.adaptation or {})
    data = ModelCardData(
        library_name="diffusers",
        license="mit",
        base_model=_hub_base_model(config.base_model),
        tags=list(tags),
        pipeline_tag=pipeline_tag,
    )
    lines = [
        f"# {title}",
        "",
        f"{description} Made with {project}.",
        "",
        f"* Source domain: `{config.source_label}`",
        f"* Target domain: `{config.target_label or '(not adapted)'}`",
        f"* Base model: `{config.base_model or 'unknown'}`",
        f"* Prompt scheme: `{adaptation.get('stage1', {}).get('scheme', 'n/a')}` (adaptive = IPL, manual = NADA)",
    ]
    stage1 = adaptation.get("stage1", {})
    regulariser = stage1.get("domain_regularizer", "feature")
    # A card must not pass a variant off as the paper's method; only the trained schemes use it.
    if regulariser != "feature" and stage1.get("scheme") in TRAINED_SCHEMES:
        lines.append(f"* Stage 1 domain regulariser: `{regulariser}` (not in the paper: each prompt direction towards "
                     "the label direction, in place of Eq. 5)")
    lines.append("")
    if pipe.sample_grid is not None:
        lines += [grid_caption, "", f"![samples]({SAMPLE_GRID_NAME})", ""]
    options = _options_table(adaptation)
    if options or config.get("run_summary"):
        lines += ["## Training run", "", *_numbers(config.get("run_summary")), *options, ""]
    lines += [
        "## Usage",
        "",
        f"The pipeline's code is the ipl-diffusion package (`{INSTALL_HINT}`); the `.py` files of this repository "
        "only import it, so that plain diffusers can load the repository:",
        "",
        "```python",
        usage.strip(),
        "```",
        "",
        f"`{type(pipe).__name__}.from_pretrained(\"{repo_id}\")` (from `ipl_diffusion`) loads it too, without "
        "running the repository's code files.",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
