"""Automatic step choice: keep Stage-2 candidates every N steps, score them on held-out sources, pick one.

Users of StyleGAN-NADA and DiffusionCLIP train too long and retrain to find the best
iteration (NADA issues #6, #15; DiffusionCLIP #21). With ``candidate_steps=N`` the Stage-2
loop (:class:`~ipl_diffusion.adaptation.trainer.Trainer`) keeps the trained model every N
iterations and at the last one, and scores each candidate on **held-out sources** the run
never trains on (DiffAE: the held-out photos, DDIM-inverted with the source UNet and decoded
with the candidate; StyleGAN2: fixed ``z`` rendered by ``G_s`` and the candidate ``g_ema``).
From the CLIP image features ``s_i`` of the K sources and ``a_i`` of their adapted images
(L2-normalised; ``t`` is the template-averaged label direction ``T(target) - T(source)``):

* **direction** -- mean CLIP directional similarity ``cos(a_i - s_i, t)``
  (:func:`~ipl_diffusion.metrics.clip_metrics.directional_similarity_from_features`): did the
  images move towards the target domain;
* **preservation** -- mean over i of ``cos(a_i, s_i) - mean_{j != i} cos(a_i, s_j)``: how much
  more an adapted image resembles its *own* source than the other sources (0: it no longer
  tells its source apart). A raw ``cos(a_i, s_i)`` would not do: a perfect translation changes
  the style, so it is low even when all content is kept (0.69 for the renderer's ground-truth
  sketches of the Shapes photos, whose mutual cosine is 0.47);
* **diversity** -- mean pairwise ``1 - cos(a_i, a_j)`` of the adapted images (mode collapse
  drives it to 0).

Preservation and diversity are reported as ratios to the unchanged sources' own values
(``preservation(s, s) = 1 - mean_{i != j} cos(s_i, s_j)``, the sources' diversity), so the
thresholds below mean the same for any CLIP: the Shapes renderer's ground-truth sketches keep
0.93 of the photos' preservation and 1.01 of their diversity.

**The selection rule** (:func:`choose_step`): a candidate is *eligible* when it keeps at least
``min_preservation`` of the sources' preservation and ``min_diversity`` of their diversity
(default: half; loose guards against a run that lost the content or collapsed). Among the
eligible ones, those within ``direction_tolerance`` (default 5 %) of the best direction have
*reached the target*; the **earliest** of them is chosen. If no candidate is eligible, the one
with the highest preservation ratio is (the run left its sources behind everywhere, so the one
that kept them best). Why the earliest: the direction is what Stage 2 optimises; once it has
plateaued, further steps mostly move the content (the overshoot users retrain to avoid), so
the first step on the plateau is as far towards the target as the run gets, with the least
drift. A run that is still improving at its end returns its last step. (On the shipped
Shapes DiffAE, seed 0, the direction rose 0.51 / 0.69 / 0.78 / 0.79 / 0.80 / 0.81 at steps
5-30 while the oracle's shape-kept fell from 0.69 at step 15 to 0.59 at step 30; that run
was used to design the rule, see ``benchmarks/README.md``.)

Weights: candidate ``step`` is written with the trained module's ``save_pretrained``
(safetensors + config.json, loadable by that class's ``from_pretrained``) to
``output_dir/candidates/step-<step>/`` while the run goes on, so a resumed run can still
return a candidate from before the interruption; at the end the folder is deleted unless
``keep_candidates`` (the chosen weights are the returned model's). Without an output folder
the weights stay in memory, only those of the candidates that can still be chosen
(:func:`possible_steps`). The scores are written to ``step_choice.json``, ``step_choice.csv`` and ``step_choice.png`` and
recorded in ``run_config.json["step_choice"]``.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ipl_diffusion.errors import UserError
from ipl_diffusion.metrics.clip_metrics import directional_similarity_from_features

CANDIDATES_DIR = "candidates"
REPORT_NAME = "step_choice"
RULE = ("the earliest candidate within direction_tolerance of the best CLIP direction among those keeping "
        ">= min_preservation of the sources' preservation and >= min_diversity of their diversity; "
        "if none keeps them, the highest preservation")


# ------------------------------------------------------------------------- scores


def preservation(adapted: torch.Tensor, source: torch.Tensor) -> float:
    """Mean ``cos(a_i, s_i) - mean_{j != i} cos(a_i, s_j)`` of paired ``(K, D)`` features, K >= 2.

    Raises:
        UserError: unpaired features or fewer than 2 pairs (no other source to compare with).
    """
    if adapted.shape != source.shape or adapted.shape[0] < 2:
        raise UserError(f"preservation needs >= 2 paired features; got {tuple(adapted.shape)} and {tuple(source.shape)}")
    sim = F.normalize(adapted.double(), dim=-1) @ F.normalize(source.double(), dim=-1).T
    k = sim.shape[0]
    own = sim.diagonal()
    others = (sim.sum(dim=1) - own) / (k - 1)
    return float((own - others).mean())


def diversity(features: torch.Tensor) -> float:
    """Mean pairwise ``1 - cos`` of ``(K, D)`` features, K >= 2 (0: all identical)."""
    f = F.normalize(features.double(), dim=-1)
    k = f.shape[0]
    off_diagonal = (f @ f.T).sum() - k
    return float(1 - off_diagonal / (k * (k - 1)))


def score_candidate(source_features: torch.Tensor, adapted_features: torch.Tensor, source_text: torch.Tensor,
                    target_text: torch.Tensor) -> dict[str, float]:
    """The scores of one candidate from raw CLIP features.

    Args:
        source_features, adapted_features: ``(K, D)`` raw image features of the held-out
            sources and of the candidate's images of them (paired rows), K >= 2.
        source_text, target_text: ``(D,)`` label features (the direction is their difference).

    Returns:
        ``{"direction", "preservation", "diversity", "preservation_ratio", "diversity_ratio"}``
        (floats; the ratios divide by the unchanged sources' own preservation / diversity).

    Raises:
        UserError: unpaired features, K < 2, or identical label features.
    """
    direction = directional_similarity_from_features(source_features, adapted_features, source_text, target_text)
    kept, varied = preservation(adapted_features, source_features), diversity(adapted_features)
    return {"direction": float(direction.mean()), "preservation": kept, "diversity": varied,
            "preservation_ratio": kept / max(preservation(source_features, source_features), 1e-12),
            "diversity_ratio": varied / max(diversity(source_features), 1e-12)}


def _eligible(candidates, min_preservation, min_diversity):
    return [c for c in candidates if c["preservation_ratio"] >= min_preservation and c["diversity_ratio"] >= min_diversity]


def _reached(eligible, direction_tolerance):
    """The eligible candidates within ``direction_tolerance`` (a fraction) of the best direction."""
    best = max(c["direction"] for c in eligible)
    return [c for c in eligible if c["direction"] >= best - direction_tolerance * abs(best)]


def choose_step(candidates: list[dict], min_preservation: float, min_diversity: float,
                direction_tolerance: float) -> int:
    """The selection rule (module docstring) on ``candidates`` (dicts with ``step``,
    ``direction``, ``preservation_ratio``, ``diversity_ratio``, in any order); returns the
    chosen ``step``.

    Raises:
        UserError: no candidates.
    """
    if not candidates:
        raise UserError("no candidates to choose from")
    eligible = _eligible(candidates, min_preservation, min_diversity)
    if eligible:
        return min(c["step"] for c in _reached(eligible, direction_tolerance))
    # max() keeps the first of equal keys: the earliest step on a tie
    return max(sorted(candidates, key=lambda c: c["step"]), key=lambda c: c["preservation_ratio"])["step"]


def possible_steps(candidates: list[dict], min_preservation: float, min_diversity: float,
                   direction_tolerance: float) -> set[int]:
    """The candidates that later candidates can still make the choice: the eligible ones that
    reach the target now (the bar only rises), else the best preservation so far."""
    eligible = _eligible(candidates, min_preservation, min_diversity)
    if eligible:
        return {c["step"] for c in _reached(eligible, direction_tolerance)}
    return {choose_step(candidates, min_preservation, min_diversity, direction_tolerance)}


# ------------------------------------------------------------------------- the plot


def plot_scores(candidates: list[dict], chosen: int, min_preservation: float, min_diversity: float,
                size=(480, 300)):
    """A small PIL line plot (RGB): direction (blue), preservation ratio (green) and diversity
    ratio (orange) against the step, the two thresholds dashed in their colours, the chosen
    step as a grey vertical line. Drawn with PIL alone (matplotlib is no dependency)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    left, right, top, bottom = 44, 12, 24, 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    steps = [c["step"] for c in candidates]
    series = {"direction": (31, 119, 180), "preservation_ratio": (44, 160, 44), "diversity_ratio": (255, 127, 14)}
    values = [c[k] for c in candidates for k in series] + [min_preservation, min_diversity, 0.0]
    lo, hi = min(values), max(values + [1.0])
    x_of = lambda s: left + (s - min(steps)) / max(max(steps) - min(steps), 1) * (width - left - right)  # noqa: E731
    y_of = lambda v: top + (hi - v) / max(hi - lo, 1e-12) * (height - top - bottom)  # noqa: E731
    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for v in (lo, 0.0, hi):
        draw.text((2, y_of(v) - 6), f"{v:.2f}", fill=(0, 0, 0), font=font)
    draw.line([x_of(chosen), top, x_of(chosen), height - bottom], fill=(150, 150, 150), width=2)
    for threshold, key in ((min_preservation, "preservation_ratio"), (min_diversity, "diversity_ratio")):
        for x in range(left, width - right, 8):  # dashed
            draw.line([x, y_of(threshold), min(x + 4, width - right), y_of(threshold)], fill=series[key])
    for key, colour in series.items():
        points = [(x_of(c["step"]), y_of(c[key])) for c in candidates]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    x = left
    for text, colour in (("direction", series["direction"]), ("preservation", series["preservation_ratio"]),
                         ("diversity (ratios, dashed: thresholds)", series["diversity_ratio"]),
                         (f"| chosen step {chosen}", (110, 110, 110))):
        draw.text((x, 6), text, fill=colour, font=font)
        x += int(draw.textlength(text, font=font)) + 8
    for s in sorted({steps[0], steps[-1], chosen}):
        draw.text((x_of(s) - 8, height - bottom + 4), str(s), fill=(0, 0, 0), font=font)
    return image


# ------------------------------------------------------------------------- the record


def _state_dict_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class StepChoice:
    """The candidates of one Stage-2 run (see the module docstring).

    Args:
        image_features: ``(K,3,H,W) in [-1,1] -> (K, D)`` raw CLIP image features.
        source_text, target_text: ``(D,)`` template-averaged label features.
        config: the run's :class:`~ipl_diffusion.configs.TrainingConfig` (``candidate_steps``,
            ``keep_candidates``, ``min_preservation``, ``min_diversity``, ``direction_tolerance``,
            ``iterations``).
        output_dir: ``candidates/`` and the reports go there (None: weights kept in memory only).
        is_main_process: only the main process writes.
    """

    def __init__(self, image_features: Callable, source_text: torch.Tensor, target_text: torch.Tensor, config,
                 output_dir: Path | None = None, is_main_process: bool = True):
        self.image_features = image_features
        self.source_text = source_text.detach().float().cpu().flatten()
        self.target_text = target_text.detach().float().cpu().flatten()
        self.config = config
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.writes = self.output_dir is not None and is_main_process
        self.candidates: list[dict] = []
        self._kept: dict[int, dict] = {}  # without an output folder: step -> CPU state dict

    def due(self, step: int) -> bool:
        """Whether ``step`` (completed iterations) is a candidate: every ``candidate_steps`` and the last."""
        n = self.config.candidate_steps
        return bool(n) and step > 0 and (step % n == 0 or step == self.config.iterations)

    def folder(self, step: int) -> Path:
        return self.output_dir / CANDIDATES_DIR / f"step-{step:06d}"

    @torch.no_grad()
    def add(self, step: int, source: torch.Tensor, adapted: torch.Tensor, model: torch.nn.Module) -> dict:
        """Score candidate ``step`` (``source`` / ``adapted``: ``(K,3,H,W)`` in ``[-1,1]``, K >= 2)
        and keep ``model``'s weights: in ``candidates/step-<step>`` (``save_pretrained``) with an
        output folder, else in memory while it can still be chosen. A candidate of the same
        step (a resumed run redoing it) is replaced. Returns its scores."""
        from ipl_diffusion.outputs import atomic_folder

        feats = [self.image_features(x).detach().float().cpu() for x in (source, adapted)]
        record = {"step": int(step), **score_candidate(*feats, self.source_text, self.target_text)}
        self.candidates = [c for c in self.candidates if c["step"] != step] + [record]
        if self.output_dir is not None:
            if self.writes:
                with atomic_folder(self.folder(step)) as tmp:
                    model.save_pretrained(tmp, safe_serialization=True)
            return record
        possible = possible_steps(self.candidates, *self._rule())
        self._kept = {s: w for s, w in self._kept.items() if s in possible}
        if step in possible:
            self._kept[step] = _state_dict_copy(model)
        return record

    def _rule(self) -> tuple[float, float, float]:
        cfg = self.config
        return cfg.min_preservation, cfg.min_diversity, cfg.direction_tolerance

    def chosen_step(self) -> int:
        return choose_step(self.candidates, *self._rule())

    # -- resume --------------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint records (JSON): ``{"step_choice": {"candidates": [...]}}``."""
        return {"step_choice": {"candidates": list(self.candidates)}}

    def restore(self, saved: dict, step: int) -> None:
        """Continue the candidate list of checkpoint config ``saved`` at ``step`` (later ones,
        scored by the interrupted run after its checkpoint, are scored again)."""
        self.candidates = [c for c in saved.get("step_choice", {}).get("candidates", []) if c["step"] <= step]
        self._kept = {}

    # -- the end -------------------------------------------------------------------------
    def finish(self, model: torch.nn.Module, accelerator=None) -> dict:
        """Load the chosen candidate's weights into ``model`` (in place), write the reports,
        delete ``candidates/`` unless ``keep_candidates``; returns the summary
        recorded in ``run_config.json["step_choice"]``.

        Raises:
            UserError: the chosen candidate's weights are neither in memory nor on disk (its
                folder was deleted between an interruption and the resume).
        """
        pick = self.chosen_step()
        if accelerator is not None:
            accelerator.wait_for_everyone()  # the main process has written the last candidate
        weights = self._kept[pick] if self.output_dir is None else self._load(pick)
        model.load_state_dict(weights)
        if accelerator is not None:
            accelerator.wait_for_everyone()  # every process has read the weights before the folder goes
        summary = {"rule": RULE, "candidate_steps": self.config.candidate_steps,
                   **dict(zip(("min_preservation", "min_diversity", "direction_tolerance"), self._rule())),
                   "chosen_step": pick, "last_step": max(c["step"] for c in self.candidates),
                   "candidates": sorted(self.candidates, key=lambda c: c["step"])}
        if self.writes:
            self._write_reports(summary)
            self._prune()
        return summary

    def _load(self, step: int) -> dict:
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
        from safetensors.torch import load_file

        path = self.folder(step) / SAFETENSORS_WEIGHTS_NAME if self.output_dir is not None else None
        if path is None or not path.is_file():
            raise UserError(f"the chosen step-choice candidate (step {step}) has no weights: {path} is missing")
        return load_file(str(path))

    def _write_reports(self, summary: dict) -> None:
        from ipl_diffusion.outputs import atomic_save_image, atomic_write_text

        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.output_dir / f"{REPORT_NAME}.json", json.dumps(summary, indent=2))
        columns = ["step", "direction", "preservation", "diversity", "preservation_ratio", "diversity_ratio"]
        text = io.StringIO()
        writer = csv.DictWriter(text, columns + ["chosen"], extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for c in summary["candidates"]:
            writer.writerow({**{k: (f"{c[k]:.6g}" if k != "step" else c[k]) for k in columns},
                             "chosen": int(c["step"] == summary["chosen_step"])})
        atomic_write_text(self.output_dir / f"{REPORT_NAME}.csv", text.getvalue())
        plot = plot_scores(summary["candidates"], summary["chosen_step"], *self._rule()[:2])
        atomic_save_image(plot, self.output_dir / f"{REPORT_NAME}.png")

    def _prune(self) -> None:
        # The chosen weights are the returned model's: without keep_candidates no folder stays.
        if not self.config.keep_candidates:
            shutil.rmtree(self.output_dir / CANDIDATES_DIR, ignore_errors=True)


def remove_earlier_reports(output_dir) -> None:
    """Delete the step-choice reports and kept candidates an earlier run left in ``output_dir``
    (``step_choice.json/.csv/.png``, ``candidates/``). Called where a run without a step choice
    has just replaced that run's result (``ipl adapt --overwrite``), so that no report of a
    result that is gone sits beside the new one."""
    folder = Path(output_dir)
    for suffix in (".json", ".csv", ".png"):
        (folder / f"{REPORT_NAME}{suffix}").unlink(missing_ok=True)
    if (folder / CANDIDATES_DIR).is_dir() and not (folder / CANDIDATES_DIR).is_symlink():
        shutil.rmtree(folder / CANDIDATES_DIR)
