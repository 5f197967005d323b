"""Atomic, resumable training checkpoints in safetensors + JSON.

Why not ``Accelerator.save_state``? It writes the optimizer and the RNG states with
``torch.save`` (``optimizer.bin``, ``random_states_0.pkl``), and ``load_state`` reads them
back with ``torch.load`` -- i.e. it unpickles. Our rule is that nothing we write needs
unpickling, so a checkpoint here is a folder of

* ``state.safetensors`` -- every tensor: model weights (``model/<name>/<key>``), the
  optimizer's per-parameter state (``optimizer/<name>/<param index>/<key>``, e.g. Adam's
  ``exp_avg``/``exp_avg_sq``/``step``), and the RNG states (``rng/torch``, ``rng/cuda/<i>``,
  ``rng/numpy``, ``rng/generator/<name>``) as uint8/int64 tensors;
* ``checkpoint.json`` -- the step, the run config, the optimizers' ``param_groups``
  (learning rates, betas, ... all JSON numbers), the non-tensor optimizer state entries,
  the scalar parts of numpy's and Python's RNG states, and the sha256 digests of
  ``state.safetensors`` and of the JSON's own content (``"sha256"``).

Integrity: :func:`load_checkpoint` recomputes both digests before it restores anything, so a
checkpoint changed on disk (a flipped bit, an edit, a partial copy) is refused with a
:class:`~ipl_diffusion.errors.UserError` naming the file, instead of resuming silently from
damaged weights. Checkpoints written before digests were recorded load unchecked.

Models are passed *unwrapped* (``accelerator.unwrap_model(model)``) so the keys never carry
a DDP ``module.`` prefix, and only the main process calls :func:`save_checkpoint`.

:class:`ResumableRun` wraps both for a training loop: it resumes on construction and
checkpoints with the step and the wall time spent so far.

Atomicity: everything is written into a hidden temporary folder beside the target, flushed
to disk, then moved into place with ``os.replace`` -- a run killed mid-write leaves either
the previous checkpoints or a ``.tmp-*`` folder that :func:`list_checkpoints` ignores, never
a half-written ``checkpoint-<step>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ipl_diffusion.configs import Stage1Config
from ipl_diffusion.errors import UserError, UserFileNotFoundError
from ipl_diffusion.outputs import atomic_folder, refuse_earlier_result, refuse_occupied

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "state.safetensors"
META_FILE = "checkpoint.json"
FORMAT_VERSION = 1

_NAME_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
DIGEST_KEY = "sha256"


# ----------------------------------------------------------------------------- digests


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _meta_sha256(meta: dict) -> str:
    """Digest of the JSON content without its ``"sha256"`` entry, in a canonical form."""
    body = {k: v for k, v in meta.items() if k != DIGEST_KEY}
    # Through JSON once, so the digest at save time (tuples, int keys) is that of what is read back.
    body = json.loads(json.dumps(body))
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify_checkpoint(path: str | os.PathLike, meta: dict) -> None:
    """Check ``path``'s files against the digests in its ``meta`` (``checkpoint.json``).

    Raises:
        UserError: a digest does not match; the message names the file.
    """
    path = Path(path)
    recorded = meta.get(DIGEST_KEY)
    if recorded is None:  # written before digests were recorded
        return
    actual = {META_FILE: _meta_sha256(meta), STATE_FILE: _file_sha256(path / STATE_FILE)}
    for name in (META_FILE, STATE_FILE):
        if recorded.get(name) != actual[name]:
            raise UserError(
                f"checkpoint file {path / name} does not match the sha256 digest recorded when it was written "
                f"(changed or damaged on disk); delete {path.name} to resume from the checkpoint before it, "
                "or start a new run"
            )


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """One sha256 over named tensors (names, dtypes, shapes and bytes, in name order), for a
    safetensors file's metadata: it survives the file being rewritten with another layout."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def verify_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping | None) -> None:
    """Check tensors loaded from ``path`` against the ``"sha256"`` (:func:`tensors_sha256`) in
    its safetensors metadata; files without one (written before digests) pass.

    Raises:
        UserError: a mismatch; the message names the file and says to delete it.
    """
    recorded = (metadata or {}).get(DIGEST_KEY)
    if recorded is not None and recorded != tensors_sha256(tensors):
        raise UserError(
            f"{path} does not match the sha256 digest recorded when it was written (changed or damaged on "
            "disk); delete it to have it computed again"
        )


# ----------------------------------------------------------------------------- RNG state


def _capture_rng(generators: Mapping[str, torch.Generator] | None) -> tuple[dict, dict]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }
    for name, generator in (generators or {}).items():
        tensors[f"rng/generator/{name}"] = generator.get_state()
    return tensors, meta


def _restore_rng(tensors: dict, meta: dict, generators: Mapping[str, torch.Generator] | None) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    np_meta = meta["numpy"]
    np.random.set_state(
        (
            np_meta["kind"],
            tensors["rng/numpy"].numpy().astype(np.uint32),
            np_meta["pos"],
            np_meta["has_gauss"],
            np_meta["cached_gaussian"],
        )
    )
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    for name, generator in (generators or {}).items():
        key = f"rng/generator/{name}"
        if key not in tensors:
            raise UserError(f"checkpoint has no state for generator {name!r}")
        generator.set_state(tensors[key])


# ----------------------------------------------------------------------- optimizer state


def _flatten_optimizer(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split ``optimizer.state_dict()`` into tensors (safetensors) and the rest (JSON)."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{name}/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(name: str, tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    prefix = f"optimizer/{name}/"
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, entry = key[len(prefix) :].split("/", 1)
            state.setdefault(int(index), {})[entry] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------------------ public


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (by step).

    A folder counts only if it is named ``checkpoint-<step>`` and holds both files; the
    temporary folders of an interrupted write are skipped.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME_RE.match(child.name)
        if match and (child / STATE_FILE).is_file() and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(output_dir: str | os.PathLike, name: str | os.PathLike | None) -> Path | None:
    """Turn ``--resume_from_checkpoint`` into a folder.

    ``"latest"`` gives the newest complete checkpoint in ``output_dir`` or ``None`` when
    there is none (a fresh run). Anything else is a checkpoint folder, either a path or a
    name inside ``output_dir``; a missing one raises ``UserFileNotFoundError`` (a
    ``FileNotFoundError``) listing the available ones.
    """
    if name is None:
        return None
    if str(name) == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    for candidate in (Path(name), Path(output_dir) / str(name)):
        if (candidate / META_FILE).is_file() and (candidate / STATE_FILE).is_file():
            return candidate
    raise UserFileNotFoundError(
        f"checkpoint {str(name)!r} not found (expected a folder with {STATE_FILE} and {META_FILE}, "
        f"or 'latest'); available: {[p.name for p in list_checkpoints(output_dir)] or 'none'}"
    )


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    config: dict | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    keep: int | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically and return its path.

    Args:
        output_dir: run folder; created if missing.
        step: the number of completed optimisation steps (resume continues at ``step``).
        models: ``name -> module`` (unwrapped); their ``state_dict()`` is stored.
        optimizers: ``name -> optimizer`` (an ``AcceleratedOptimizer`` works too).
        config: JSON-serialisable run config, stored as is and returned by
            :func:`load_checkpoint`.
        generators: ``name -> torch.Generator`` whose states are stored besides the global
            torch / CUDA / numpy / Python RNG states.
        keep: keep only the ``keep`` newest checkpoints (``None`` or 0 keeps all).

    An existing checkpoint for the same step is replaced (also atomically).
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"format_version": FORMAT_VERSION, "step": int(step), "config": config or {}, "optimizers": {}}
    for name, module in models.items():
        for key, value in module.state_dict().items():
            tensors[f"model/{name}/{key}"] = value
    for name, optimizer in (optimizers or {}).items():
        opt_tensors, opt_meta = _flatten_optimizer(name, optimizer)
        tensors.update(opt_tensors)
        meta["optimizers"][name] = opt_meta
    rng_tensors, meta["rng"] = _capture_rng(generators)
    tensors.update(rng_tensors)
    # safetensors refuses tensors that share memory or are not contiguous; copy to CPU.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    target = root / f"{CHECKPOINT_PREFIX}{int(step)}"
    with atomic_folder(target) as tmp:
        save_file(tensors, str(tmp / STATE_FILE), metadata={"format": "pt"})
        with open(tmp / STATE_FILE, "rb") as handle:
            os.fsync(handle.fileno())
        meta[DIGEST_KEY] = {STATE_FILE: _file_sha256(tmp / STATE_FILE), META_FILE: _meta_sha256(meta)}
        with open(tmp / META_FILE, "w") as handle:
            json.dump(meta, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(
    path: str | os.PathLike,
    models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    restore_rng: bool = True,
) -> tuple[int, dict]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns ``(step, config)``.

    Every refusal is a :class:`~ipl_diffusion.errors.UserError`: a folder that is not a
    checkpoint (``UserFileNotFoundError``), an unreadable file, and (models are loaded
    strictly) a checkpoint from a different architecture, named by its missing / unexpected
    keys. A file that does not match the
    digest recorded at save time raises :class:`~ipl_diffusion.errors.UserError` naming it
    (:func:`verify_checkpoint`), before anything is restored. Tensors are moved to each
    module's / optimizer parameter's device by ``load_state_dict``.
    """
    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / STATE_FILE).is_file():
        raise UserFileNotFoundError(f"{path} is not a checkpoint folder (needs {STATE_FILE} and {META_FILE})")
    try:
        with open(path / META_FILE) as handle:
            meta = json.load(handle)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported checkpoint format {meta.get('format_version')!r}")  # caught below
        tensors = load_file(str(path / STATE_FILE))
    except (ValueError, OSError, SafetensorError) as err:  # json's error is a ValueError
        raise UserError(
            f"checkpoint {path} is unreadable ({err}); it was cut short or edited -- delete that folder "
            "to resume from the one before it"
        ) from None
    verify_checkpoint(path, meta)  # readable, but is it what was written?
    for name, module in models.items():
        prefix = f"model/{name}/"
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state:
            raise UserError(f"{path}: checkpoint has no weights for model {name!r}")
        result = module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise UserError(
                f"{path}: weights for {name!r} do not match the model: "
                f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
    for name, optimizer in (optimizers or {}).items():
        if name not in meta["optimizers"]:
            raise UserError(f"{path}: checkpoint has no state for optimizer {name!r}")
        optimizer.load_state_dict(_unflatten_optimizer(name, tensors, meta["optimizers"][name]))
    if restore_rng:
        _restore_rng(tensors, meta["rng"], generators)
    return int(meta["step"]), meta["config"]


# Options that must match for a checkpoint to continue a run; the number of iterations and
# the checkpoint / sample intervals may change (e.g. to extend a finished run).
_RUN_IDENTITY = (("source",), ("target",), ("stage1", "scheme"), ("stage1", "lambda_domain"),
                 ("stage1", "lambda_source"), ("stage1", "domain_regularizer"),
                 ("stage2", "learning_rate"), ("stage2", "batch_size"), ("stage2", "seed"),
                 ("target_images", "sha256"))  # an image-defined target's style images
# What a checkpoint written before an option existed ran with: the option's default.
_IDENTITY_DEFAULTS = {("stage1", name): getattr(Stage1Config(), name) for name in ("lambda_source", "domain_regularizer")}


def check_same_run(path: str | os.PathLike, saved: Mapping, current: Mapping) -> None:
    """Refuse to resume from a checkpoint written by a run with other settings.

    ``saved`` / ``current`` are the trainers' run configs (``source``, ``target``, ``stage1``,
    ``stage2`` dicts). Raises :class:`~ipl_diffusion.errors.UserError` naming the first option
    that differs.
    """
    for keys in _RUN_IDENTITY:
        old, new = saved, current
        for key in keys:
            old = old.get(key) if isinstance(old, Mapping) else None
            new = new.get(key) if isinstance(new, Mapping) else None
        if old is None and isinstance(saved.get(keys[0]), Mapping):
            old = _IDENTITY_DEFAULTS.get(keys)
        if old is not None and new is not None and old != new:
            raise UserError(
                f"checkpoint {path} belongs to another run ({'.'.join(keys)} was {old!r} there, {new!r} now); "
                "resume with the same options, write to a new output folder, or start afresh here "
                "(CLI: --overwrite without --resume_from_checkpoint)"
            )


def check_before_run(output_dir: str | os.PathLike, resume_from_checkpoint: str | os.PathLike | None,
                     run_identity: Mapping | None = None, overwrite: bool = False) -> None:
    """What a run checks in its checkpoint folder before it writes anything (Stage 1 first).

    ``output_dir`` must be a folder (or not exist yet). A fresh run (``resume_from_checkpoint=None``,
    or a checkpoint of another folder) must not find an earlier run's checkpoints
    (:func:`refuse_foreign_checkpoints`); a resumed one must name a checkpoint that exists
    (:func:`resolve_checkpoint`: ``UserFileNotFoundError`` listing the available ones) whose files
    match their digests (:func:`verify_checkpoint`: ``UserError`` naming the file) and, given
    ``run_identity`` (the run config as far as it is known before Stage 1: ``source``,
    ``target``, ``stage1``, ``stage2``), that was written by the same run
    (:func:`check_same_run`), so that a misspelt name, a damaged checkpoint or a changed option
    fails in a second rather than after Stage 1 has rewritten its outputs. With ``overwrite`` a
    fresh run may find checkpoints: it replaces them (:func:`prepare_checkpoint_folder`).
    """
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise UserError(f"{output_dir} is a file where the run's checkpoint folder goes; move it away or choose "
                        "another output folder")
    path = resolve_checkpoint(output_dir, resume_from_checkpoint)  # None: a fresh run
    if not overwrite and not _inside(Path(output_dir), path):
        refuse_foreign_checkpoints(output_dir)  # the new run's rotation would delete them
    if path is not None:  # a damaged checkpoint fails now, not after the sources are encoded
        try:
            meta = json.loads((path / META_FILE).read_text())
        except ValueError:
            return  # unreadable JSON: load_checkpoint says so, with its own message
        verify_checkpoint(path, meta)
        if run_identity is not None:
            check_same_run(path, meta.get("config") or {}, run_identity)


def refuse_foreign_checkpoints(output_dir: str | os.PathLike) -> None:
    """Before a fresh (not resumed) run: ``UserError`` when ``output_dir`` already holds
    checkpoints, which the new run's rotation would otherwise delete."""
    found = list_checkpoints(output_dir)
    if found:
        raise UserError(
            f"{output_dir} already holds checkpoints of an earlier run ({found[-1].name}); resume it with "
            "resume_from_checkpoint='latest' (CLI: --resume-from-checkpoint latest), choose a new output folder, "
            "or (CLI) pass --overwrite to replace them"
        )


# The DiffAE Stage-2 cache (adaptation.diffae writes it under this name).
STAGE2_CACHE_NAME = "cache.safetensors"
# What a run leaves before its first checkpoint that a resume reuses (each checked against the
# run's options when read): adaptation.stage1.save_stage1's record and the DiffAE Stage-2 cache.
RUN_STATE = ("stage1/options.json", STAGE2_CACHE_NAME)


def check_output_dir(output_dir, resume_from_checkpoint, overwrite: bool, result_names, what: str = "--output_dir") -> None:
    """Before any model loads: may a training run write into ``output_dir`` (its checkpoints in
    ``output_dir/checkpoints``)? The one rule of ``ipl adapt`` and ``examples/train_ipl_diffae.py``.

    * ``overwrite``: yes; a fresh run replaces the earlier run's checkpoints, but only once all
      its inputs have been checked (``adapt(..., overwrite=True)``:
      :func:`prepare_checkpoint_folder`), so that a run refused on its model, CLIP or labels
      loses nothing.
    * A resume of one of this folder's own checkpoints (``"latest"`` or a name / path resolving
      into ``output_dir/checkpoints``): yes.
    * Otherwise the folder must hold no earlier result (any of ``result_names``:
      :func:`~ipl_diffusion.outputs.refuse_earlier_result`), a fresh run no checkpoints (their
      rotation would delete them: :func:`refuse_foreign_checkpoints`), and nothing else
      (:func:`~ipl_diffusion.outputs.refuse_occupied`: a user's file under a name the run writes
      would be replaced) -- except that ``"latest"`` continues a run of this folder that stopped
      before its first checkpoint (:data:`RUN_STATE` there).

    A checkpoint named for resuming must exist and be intact (:func:`check_before_run`).

    Raises:
        UserError: the message names the folder, what it holds, and how to proceed.
    """
    output, checkpoints = Path(output_dir), Path(output_dir) / "checkpoints"
    if overwrite and resume_from_checkpoint is None:
        return
    if not overwrite and not _resumes_own_checkpoint(checkpoints, resume_from_checkpoint):
        refuse_earlier_result(output, result_names, what)
        if resume_from_checkpoint is None:
            refuse_foreign_checkpoints(checkpoints)  # before the generic refusal: it says "resume it"
        stopped_early = any((output / name).is_file() for name in RUN_STATE)
        if not (stopped_early and str(resume_from_checkpoint) == "latest"):
            # A run that stopped there is continued by resuming: say so, not only --overwrite.
            hint = "pass --resume_from_checkpoint latest to continue the run that stopped there, or --overwrite"
            refuse_occupied(output, what, hint if stopped_early else "pass --overwrite")
    check_before_run(checkpoints, resume_from_checkpoint, overwrite=overwrite)


def _resumes_own_checkpoint(checkpoints: Path, resume_from_checkpoint) -> bool:
    """Does ``resume_from_checkpoint`` name a checkpoint inside ``checkpoints`` (not one of another
    folder, whose run would then rotate this folder's checkpoints away)?"""
    return _inside(checkpoints, resolve_checkpoint(checkpoints, resume_from_checkpoint))  # a missing name is refused


def _inside(checkpoints: Path, path: Path | None) -> bool:
    return path is not None and path.resolve().parent == checkpoints.resolve()


def prepare_checkpoint_folder(output_dir, resume_from_checkpoint, run_identity: Mapping, overwrite: bool,
                              accelerator) -> None:
    """An adaptation run's last check before it writes: :func:`check_before_run`, then, with
    ``overwrite`` (``ipl adapt --overwrite``) and unless the run resumes one of them, delete the
    earlier run's ``checkpoint-<step>`` folders in ``output_dir`` (only those: anything else there
    stays), so that its checkpoints never mix with this run's.

    The adaptation functions call it once every input, label and option has been checked, so
    that a run refused on any of them loses nothing. The main process deletes; the others wait.

    Raises:
        UserError: as :func:`check_before_run`; a checkpoint that cannot be deleted (checked for
            all of them before the first is deleted).
    """
    check_before_run(output_dir, resume_from_checkpoint, run_identity, overwrite)
    if overwrite and not _resumes_own_checkpoint(Path(output_dir), resume_from_checkpoint):
        if accelerator.is_main_process:
            _remove_checkpoints(list_checkpoints(output_dir))
        accelerator.wait_for_everyone()


def _remove_checkpoints(paths: list[Path]) -> None:
    """Delete checkpoint folders (a symlinked one: the link), all or -- where one of them cannot
    be deleted, which is found out before the first is touched -- none."""
    def deletable(path: Path) -> bool:
        if not os.access(path.parent, os.W_OK | os.X_OK):
            return False
        if path.is_symlink():
            return True
        return all(os.access(folder, os.W_OK | os.X_OK) for folder, _, _ in os.walk(path))

    stuck = [path for path in paths if not deletable(path)]
    if stuck:
        raise UserError(f"overwrite (--overwrite) cannot delete the earlier run's {stuck[0]} (no write permission "
                        "there); nothing was deleted. Fix its permissions or choose another output folder")
    for path in paths:
        try:
            path.unlink() if path.is_symlink() else shutil.rmtree(path)
        except OSError as err:
            raise UserError(f"overwrite (--overwrite) could not delete the earlier run's {path}: {err}") from None


# ------------------------------------------------------------------- a resumable loop


class ResumableRun:
    """Step counter, wall clock and checkpoints of one training loop writing into ``folder``.

    The one resume helper of the training scripts (``examples/shapes/train_*.py``). On
    construction it resumes from ``resume_from_checkpoint`` -- ``"latest"`` (the newest
    checkpoint in ``folder``, or a fresh start when there is none), a checkpoint folder or name,
    or ``None`` / ``"none"`` for a fresh start: the models, optimizers and generators come back
    in place (:func:`load_checkpoint`), and so do the step and the wall time already spent,
    which every checkpoint carries as ``config["elapsed_seconds"]``.

    Args:
        folder: where ``checkpoint-<step>`` folders are written and looked for.
        models / optimizers / generators: as :func:`save_checkpoint` takes them.
        config: the run's options (JSON-serialisable), saved with every checkpoint.
        resume_from_checkpoint: see above.
        name: what is resumed, for the message printed on resume (e.g. ``"the gan phase"``:
            ``resumed the gan phase from <checkpoint> at step <n>``).
        keep: checkpoints kept in ``folder`` (the newest ones).

    Attributes:
        step: the number of steps done, counting resumed ones; the loop increments it.
        resumed_from: the checkpoint folder resumed from, or ``None``.
        saved_config: the resumed checkpoint's ``config`` (``None`` on a fresh start).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        models: Mapping[str, torch.nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        generators: Mapping[str, torch.Generator] | None = None,
        config: Mapping | None = None,
        resume_from_checkpoint: str | os.PathLike | None = "latest",
        name: str | None = None,
        keep: int = 2,
    ):
        self.folder, self.models, self.optimizers, self.generators = Path(folder), models, optimizers, generators
        self.config, self.keep = dict(config or {}), keep
        self.step, self.elapsed_before, self.saved_config = 0, 0.0, None
        if resume_from_checkpoint is not None and str(resume_from_checkpoint) == "none":
            resume_from_checkpoint = None
        self.resumed_from = resolve_checkpoint(self.folder, resume_from_checkpoint)
        if self.resumed_from is not None:
            self.step, self.saved_config = load_checkpoint(self.resumed_from, models, optimizers, generators)
            self.elapsed_before = float(self.saved_config.get("elapsed_seconds", 0.0))
            print(f"resumed {name + ' ' if name else ''}from {self.resumed_from} at step {self.step}")
        self.t0 = time.time()

    @property
    def resumed(self) -> bool:
        return self.resumed_from is not None

    def minutes(self) -> float:
        """Wall minutes of this process (what a ``--max_minutes`` limit bounds)."""
        return (time.time() - self.t0) / 60

    def running(self, max_steps: int, max_minutes: float | None = None) -> bool:
        """Whether the loop goes on: fewer than ``max_steps`` steps done, and this process has run
        for less than ``max_minutes`` (None: no limit)."""
        return self.step < max_steps and (max_minutes is None or self.minutes() < max_minutes)

    def elapsed(self) -> float:
        """Wall seconds of the run so far, over every process that resumed it."""
        return self.elapsed_before + time.time() - self.t0

    def save(self) -> float:
        """Checkpoint at the current step (atomic; the newest ``keep`` are kept); returns
        :meth:`elapsed` as saved in it."""
        elapsed = self.elapsed()
        config = dict(self.config, elapsed_seconds=elapsed)
        save_checkpoint(self.folder, self.step, self.models, self.optimizers, config, self.generators, keep=self.keep)
        return elapsed
