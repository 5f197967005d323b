"""Rosinality-format StyleGAN2 checkpoints (``.pt``) -> our ``save_pretrained`` folder.

Upstream format (rosinality ``stylegan2-pytorch`` ``train.py`` / ``convert_weight.py``, as
loaded by StyleGAN-NADA and the IPL reference code): a ``torch.save``'d dict with

* ``"g_ema"``: the EMA generator's state dict (the one everybody samples from),
* optionally ``"g"``, ``"d"``, ``"g_optim"``, ``"d_optim"`` (training state),
* optionally ``"latent_avg"`` ``(style_dim,)`` (the TF model's EMA of ``w``, from
  ``convert_weight.py``),
* optionally ``"args"``: the training script's ``argparse.Namespace`` (``size``,
  ``channel_multiplier``, ``latent``, ``n_mlp``, ...).

Files are read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
containers; the one class these files need beyond that, ``argparse.Namespace`` (a bag of
attributes with no code of its own), is allowed inside a ``torch.serialization.safe_globals``
block. Anything else in the pickle -- in particular a payload that would call a function such
as ``os.system`` on load -- is refused with a ``ValueError`` before it can run.

Our format is a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
written by :meth:`StyleGAN2Generator.save_pretrained`; nothing we write needs unpickling.
"""

import argparse
import os
import pickle
from pathlib import Path
from typing import Optional, Union

import torch

from ipl_diffusion.errors import UserError, UserFileExistsError, UserFileNotFoundError
from ipl_diffusion.models.stylegan2 import StyleGAN2Generator

# The only non-tensor class rosinality checkpoints carry.
SAFE_GLOBALS = [argparse.Namespace]

# ``args`` attribute name -> generator hyper-parameter (rosinality train.py option names).
_ARGS_TO_CONFIG = {"size": "size", "channel_multiplier": "channel_multiplier", "latent": "style_dim", "n_mlp": "n_mlp"}


def load_rosinality_checkpoint(path: Union[str, os.PathLike], map_location="cpu") -> dict:
    """Read a rosinality ``.pt`` file safely (``weights_only=True``) and return its dict.

    A file holding a bare generator state dict (keys ``style.1.weight``, ``input.input``, ...)
    is returned wrapped as ``{"g_ema": state_dict}``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the pickle holds objects other than tensors, containers and
            ``argparse.Namespace`` (refused, nothing executed), the file is not a torch
            checkpoint, or it has no ``g_ema`` generator.
    """
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"StyleGAN2 checkpoint {path} does not exist (expected a rosinality .pt file)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise UserError(
            f"refusing to load {path}: it contains Python objects other than tensors and "
            f"argparse.Namespace, which could run code when unpickled ({detail}). Convert it "
            f"in a trusted environment to a plain {{'g_ema': state_dict}} file first."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"{path} is not a readable torch checkpoint: {err}") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path}: expected a dict checkpoint with a 'g_ema' entry, found {type(checkpoint).__name__}")
    if "g_ema" not in checkpoint:
        if "input.input" in checkpoint and "conv1.conv.weight" in checkpoint:
            return {"g_ema": checkpoint}
        raise UserError(f"{path}: no 'g_ema' generator in the checkpoint (keys: {sorted(checkpoint)[:10]})")
    return checkpoint


def _config_from_args(args) -> dict:
    if args is None:
        return {}
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, dict) else {}
    return {ours: values[theirs] for theirs, ours in _ARGS_TO_CONFIG.items() if isinstance(values.get(theirs), int)}


def generator_from_checkpoint(checkpoint: Union[str, os.PathLike, dict], **requested) -> StyleGAN2Generator:
    """Build a :class:`StyleGAN2Generator` holding a checkpoint's ``g_ema`` (strict load).

    Args:
        checkpoint: a path to a rosinality ``.pt`` or the dict :func:`load_rosinality_checkpoint`
            returned.
        requested: optional ``size`` / ``style_dim`` / ``n_mlp`` / ``channel_multiplier`` the
            caller expects; a disagreement with the tensor shapes is a ``ValueError`` naming
            the hyper-parameter. The checkpoint's own ``args`` namespace is *not* trusted over
            the shapes (rosinality's ``--size`` can differ from the saved network's); it only
            fills ``channel_multiplier`` where the shapes cannot tell.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = load_rosinality_checkpoint(checkpoint)
    state_dict = checkpoint["g_ema"]
    from_args = _config_from_args(checkpoint.get("args"))
    if "channel_multiplier" in from_args and "channel_multiplier" not in requested:
        try:
            return StyleGAN2Generator.from_rosinality_state_dict(state_dict, **requested, channel_multiplier=from_args["channel_multiplier"])
        except ValueError:
            pass  # the args disagree with the tensor shapes: the shapes win
    return StyleGAN2Generator.from_rosinality_state_dict(state_dict, **requested)


def convert_stylegan2_checkpoint(
    checkpoint: Union[str, os.PathLike, dict],
    output_dir: Union[str, os.PathLike],
    size: Optional[int] = None,
    channel_multiplier: Optional[int] = None,
    n_mlp: Optional[int] = None,
    style_dim: Optional[int] = None,
    overwrite: bool = False,
) -> Path:
    """Convert a rosinality StyleGAN2 ``.pt`` into our folder (``StyleGAN2Generator.save_pretrained``).

    Args:
        checkpoint: path to the ``.pt`` (or its loaded dict).
        output_dir: folder to write (created); gets ``config.json`` and
            ``diffusion_pytorch_model.safetensors``. Load it with
            ``StyleGAN2Generator.from_pretrained(output_dir)``.
        size, channel_multiplier, n_mlp, style_dim: optional expectations, checked against the
            checkpoint's tensor shapes (``ValueError`` naming the one that disagrees).
        overwrite: allow writing into a non-empty ``output_dir``.
    Returns:
        ``Path(output_dir)``.
    Raises:
        FileExistsError: ``output_dir`` is a non-empty folder and ``overwrite`` is False (checked
            before the checkpoint is read, so nothing is lost).
        UserError: ``output_dir`` is not writable (checked before the checkpoint is read).
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise UserFileExistsError(f"{output_dir} exists and is not an empty folder; choose another output or pass overwrite=True (--overwrite)")
    from ipl_diffusion.outputs import check_writable

    check_writable(output_dir, "output folder")  # before the checkpoint is read
    requested = {k: v for k, v in dict(size=size, channel_multiplier=channel_multiplier, n_mlp=n_mlp, style_dim=style_dim).items() if v is not None}
    generator = generator_from_checkpoint(checkpoint, **requested)
    generator.save_pretrained(output_dir, safe_serialization=True)
    return output_dir
