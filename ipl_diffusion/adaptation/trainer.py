"""The Stage-2 training loop both backends share: loop, checkpoints / resume, NaN handling, logs.

A backend subclasses :class:`Trainer` and supplies only what differs:

* :meth:`Trainer.iteration` -- one iteration (forward, the loss of Eq. 7-9, one update),
  returning its logged values (floats: ``"loss"`` and ``"grad_norm"`` at least). It calls
  :func:`~ipl_diffusion.errors.check_finite` on its loss terms *before* the update, so a NaN
  never reaches the weights;
* :meth:`Trainer.checkpoint_state` -- the models, optimizers and ``torch.Generator`` s that
  make up the training state;
* :meth:`Trainer.sample_grid` and :meth:`Trainer.trained_model`;
* :meth:`Trainer.candidate_images` -- the held-out sources and the current model's images of
  them, for the automatic step choice (``config.candidate_steps``,
  :mod:`ipl_diffusion.adaptation.step_choice`).

Everything else is here, once:

* checkpoints through :mod:`ipl_diffusion.checkpointing` (safetensors + JSON, atomic, with
  digests; the loss history and the fp16 loss scale ride in the JSON), written by the main
  process between two ``accelerator.wait_for_everyone()``; ``resume("latest")`` continues an
  interrupted run bit for bit;
* the log: one ``losses.csv`` (a ``step`` column, then one column per logged value), rebuilt
  from the checkpointed history on resume so it holds each step once, plus accelerate's
  TensorBoard tracker when ``tensorboard`` is installed (``logs/``);
* the run's peak memory (:mod:`ipl_diffusion.adaptation.memory`) goes into
  ``run_config["memory"]``;
* a non-finite loss raises :class:`~ipl_diffusion.errors.NonFiniteLossError` on every stage
  and backend;
* the automatic step choice: with ``candidate_steps`` set (and :meth:`Trainer.enable_step_choice`
  called), a candidate is scored every N iterations and at the last, the candidate list rides in
  the checkpoints, and :meth:`Trainer.train` returns the chosen candidate's weights.
"""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path

import torch

from ipl_diffusion import checkpointing
from ipl_diffusion.adaptation.memory import PeakMemory


@contextlib.contextmanager
def frozen(*modules):
    """Temporarily ``requires_grad_(False)`` (gradients still flow *through* the modules)."""
    saved = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class LossLog:
    """``losses.csv`` (main process): a ``step`` column and one column per logged value,
    started from ``history`` (the steps a resumed run keeps), plus accelerate's TensorBoard
    tracker in ``logs/`` when ``tensorboard`` is installed."""

    def __init__(self, output_dir: Path | None, history: list[dict], enabled: bool = True):
        self._file = self._writer = self._tracker = None
        self._columns = None
        if output_dir is None or not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(output_dir / "losses.csv", "w", newline="")
        for record in history:
            self._write(record)
        from accelerate.utils import is_tensorboard_available

        if is_tensorboard_available():  # an optional extra
            from accelerate.tracking import TensorBoardTracker

            resumed_at = history[-1]["step"] if history else 0
            # purge_step: events an interrupted run logged after its last checkpoint are dropped.
            self._tracker = TensorBoardTracker("logs", output_dir, purge_step=resumed_at + 1)
            self._tracker.start()

    def _write(self, record: dict):
        if self._columns is None:  # numbers only: e.g. the GAN's list of trained layers stays in the history
            self._columns = [k for k, v in record.items() if isinstance(v, (int, float))]
            self._writer = csv.DictWriter(self._file, self._columns, extrasaction="ignore")
            self._writer.writeheader()
        self._writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in record.items()})

    def log(self, record: dict):
        if self._file is None:
            return
        self._write(record)
        self._file.flush()
        if self._tracker is not None:
            numbers = {f"stage2/{k}": record[k] for k in self._columns if k != "step"}
            self._tracker.log(numbers, step=record["step"])

    def close(self):
        if self._file is not None:
            self._file.close()
        if self._tracker is not None:
            self._tracker.finish()


class Trainer:
    """The Stage-2 loop (see the module docstring). Subclasses set ``config`` (a
    :class:`~ipl_diffusion.configs.TrainingConfig`), ``accelerator``, ``output_dir`` and
    ``run_config`` through :meth:`setup`, and implement the four backend methods."""

    description = "Stage 2"

    def setup(self, config, accelerator, output_dir, run_config: dict):
        self.config = config
        self.accelerator = accelerator
        self.device = accelerator.device
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.run_config = run_config
        self.step = 0
        self.history: list[dict] = []
        self.step_choice = None  # a StepChoice once enable_step_choice is called
        self.resumed_memory = None  # the memory report of the checkpoint resumed from

    # -- what a backend supplies -----------------------------------------------------------
    def iteration(self, *args) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def checkpoint_state(self) -> dict:  # pragma: no cover - abstract
        """``{"models": {...}, "optimizers": {...}, "generators": {...}}`` (unwrapped)."""
        raise NotImplementedError

    def sample_grid(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def trained_model(self) -> torch.nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def candidate_images(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """``(source, adapted)``: ``(K, 3, H, W)`` float32 in ``[-1, 1]``, K >= 2, the held-out
        sources and :meth:`trained_model`'s images of them now (no gradient, no RNG consumed)."""
        raise NotImplementedError

    # -- checkpoints -------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path | None:
        return self.output_dir / "checkpoints" if self.output_dir is not None else None

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/checkpoint-<step>`` (every process calls this; the main one
        writes). Returns the folder on the main process, else None."""
        if self.output_dir is None:
            return None
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            config = {**self.run_config, "history": self.history, **self._step_choice_state()}
            if acc.scaler is not None:  # fp16: the loss scale is part of the training state
                config["grad_scaler"] = acc.scaler.state_dict()
            state = self.checkpoint_state()
            path = checkpointing.save_checkpoint(
                self.checkpoint_dir, self.step, state["models"], state["optimizers"], config=config,
                generators=state.get("generators"), keep=self.config.checkpoints_total_limit,
            )
        acc.wait_for_everyone()  # nobody resumes from "latest" before the folder is in place
        return path

    def resume(self, name) -> int:
        """Restore ``name`` (``"latest"`` -- none yet: a fresh start -- or a checkpoint folder)
        on every process; returns the step.

        Raises:
            UserError: a named checkpoint that does not exist, a damaged one, or one of
                another run (other labels / scheme / architecture).
        """
        if name is None or (self.output_dir is None and str(name) == "latest"):
            return self.step
        path = checkpointing.resolve_checkpoint(self.checkpoint_dir or Path("."), name)
        if path is None:
            return self.step
        state = self.checkpoint_state()
        self.step, saved = checkpointing.load_checkpoint(
            path, state["models"], state["optimizers"], generators=state.get("generators")
        )
        checkpointing.check_same_run(path, saved, self.run_config)
        if self.accelerator.scaler is not None and saved.get("grad_scaler"):
            self.accelerator.scaler.load_state_dict(saved["grad_scaler"])
        self.history = list(saved.get("history", []))
        self.resumed_memory = saved.get("memory")  # the peak before the interruption
        if self.step_choice is not None:  # a resumed run continues the candidate list
            self.step_choice.restore(saved, self.step)
        return self.step

    # -- the loop ------------------------------------------------------------------------
    def train_step(self, *args) -> dict:
        """One iteration (:meth:`iteration`, ``args`` passed on), then the step count and the
        history advance; returns the record ``{"step": ..., **values}``.

        Raises:
            NonFiniteLossError: a loss term became NaN / inf (no update was made with it).
        """
        values = self.iteration(*args)
        self.step += 1
        record = {"step": self.step, **values}
        self.history.append(record)
        return record

    def _write_samples(self):
        folder = self.output_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        self.sample_grid().save(folder / f"step_{self.step:06d}.png")

    def train(self, resume_from_checkpoint=None, progress: bool = True) -> torch.nn.Module:
        """Run to ``config.iterations`` (every process calls this); returns
        :meth:`trained_model`, with the chosen candidate's weights when ``config.candidate_steps``
        is set. Only the main process writes the log, checkpoints, grids and step-choice reports.

        Raises:
            NonFiniteLossError: a loss term became NaN / inf (no update was made with it).
            UserError: ``candidate_steps`` without :meth:`enable_step_choice`.
        """
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        if resume_from_checkpoint is None and self.output_dir is not None:
            checkpointing.refuse_foreign_checkpoints(self.checkpoint_dir)
        self._check_step_choice()
        self.resume(resume_from_checkpoint)
        log = LossLog(self.output_dir, self.history, enabled=acc.is_main_process)
        memory = PeakMemory(self.device, earlier=self.resumed_memory)
        bar = tqdm(total=cfg.iterations, initial=self.step, desc=self.description,
                   disable=not (progress and acc.is_local_main_process))
        try:
            while self.step < cfg.iterations:
                with memory.iteration():
                    record = self.train_step()
                self._keep_candidate()  # before the checkpoint of this step, which records it
                log.log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if cfg.checkpointing_steps and self.step % cfg.checkpointing_steps == 0:
                    self.run_config["memory"] = memory.report()  # the checkpoint carries it on
                    self.save_checkpoint()
                if cfg.sample_steps and self.output_dir is not None and acc.is_main_process:
                    if self.step % cfg.sample_steps == 0 or self.step == cfg.iterations:
                        self._write_samples()
        finally:
            bar.close()
            log.close()
        acc.wait_for_everyone()
        report = memory.report()
        if report is not None:
            self.run_config["memory"] = report
        return self._chosen_model()

    # -- automatic step choice ---------------------------------------------------------
    def enable_step_choice(self, image_features, source_text: torch.Tensor, target_text: torch.Tensor) -> None:
        """Score candidates during :meth:`train` (when ``config.candidate_steps`` is set).

        Args:
            image_features: ``(K,3,H,W) in [-1,1] -> (K, D)`` raw CLIP image features.
            source_text, target_text: ``(D,)`` template-averaged label features (the direction).
        """
        from ipl_diffusion.adaptation.step_choice import StepChoice

        self.step_choice = StepChoice(image_features, source_text, target_text, self.config, self.output_dir,
                                      is_main_process=self.accelerator.is_main_process)

    def _step_choice_state(self) -> dict:
        return self.step_choice.state() if self.step_choice is not None else {}

    def _check_step_choice(self) -> None:
        if self.step_choice is None and self.config.candidate_steps:
            from ipl_diffusion.errors import UserError

            raise UserError("candidate_steps needs held-out sources and label features: call enable_step_choice first")

    def _keep_candidate(self) -> None:
        if self.step_choice is not None and self.step_choice.due(self.step):
            source, adapted = self.candidate_images()
            self.step_choice.add(self.step, source, adapted, self.trained_model())

    def _chosen_model(self) -> torch.nn.Module:
        """:meth:`trained_model`, holding the chosen candidate's weights when candidates were
        kept (the choice is recorded in ``run_config["step_choice"]``)."""
        model = self.trained_model()
        if self.step_choice is not None and self.step_choice.candidates:
            self.run_config["step_choice"] = self.step_choice.finish(model, self.accelerator)
        return model
