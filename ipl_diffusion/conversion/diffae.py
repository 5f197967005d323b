"""Upstream DiffAE Lightning checkpoints (``last.ckpt``) -> a :class:`DiffAEPipeline` folder.

Upstream format (``phizaz/diffae``, ``experiment.py::LitModel``, saved by PyTorch-Lightning
1.4's ``ModelCheckpoint``): a ``torch.save``'d dict whose ``"state_dict"`` holds

* ``ema_model.*`` -- the EMA weights every upstream inference path uses (converted);
* ``model.*`` -- the raw training weights (ignored unless ``prefix="model."``);
* ``x_T`` -- a buffer of logging noise ``(32, 3, H, W)`` (dropped: not a weight);
* ``conds_mean`` / ``conds_std`` ``(1, 512)`` -- ``z_sem`` statistics, only in
  ``*_autoenc_latent`` checkpoints, together with ``ema_model.latent_net.*``;

plus Lightning bookkeeping (``epoch``, ``global_step``, ``callbacks``, ``optimizer_states``,
``hyper_parameters`` = upstream's ``TrainConfig`` as a JSON-able dict, ...).

Safe reading. Files are read with ``torch.load(weights_only=True)``, which only rebuilds
tensors and plain containers. Lightning 1.4 keys the ``callbacks`` dict by the callback
*class object* (e.g. ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``),
which ``weights_only`` refuses. We list the file's globals with
``torch.serialization.get_unsafe_globals_in_checkpoint`` (which reads the pickle without
running it); globals from Lightning / numpy / upstream's config modules are mapped to inert
stub classes of our own (no code from the file or those packages runs, and
``pytorch_lightning`` need not be installed) inside ``torch.serialization.safe_globals``;
any other global (``os.system``, ``builtins.eval``, ...) makes us refuse the file with a
``ValueError`` before anything is unpickled. Only ``state_dict`` and ``hyper_parameters`` are
used afterwards.

Key mapping (upstream -> ours, per model; see the model modules' docstrings)::

    time_embed.time_embed.{0,2}      -> time_embedding.linear_{1,2}
    input_blocks.0.0                 -> conv_in
    input_blocks.k.0 / .1            -> down_blocks.{k-1}.resnet / .attention
    middle_block.{0,1,2}             -> mid_block.{resnet_1, attention, resnet_2}
    output_blocks.k.0 / attn / up    -> up_blocks.k.{resnet, attention, resample}
    out.{0,2} (UNet), out.{0,3} (encoder) -> norm_out, conv_out
    ResBlock: in_layers.{0,2} norm1/conv1, emb_layers.1 time_emb_proj, cond_emb_layers.1
              cond_emb_proj, out_layers.{0,3} norm2/conv2, skip_connection conv_shortcut
    Attention: norm -> group_norm; qkv (3C, C, 1), legacy head-major [q|k|v] per head ->
              to_q / to_k / to_v (C, C); proj_out (C, C, 1) -> to_out.0
    latent_net: time_embed.{0,2} -> time_embedding.linear_{1,2}; layers.k.{linear, norm};
              layers.k.linear_emb -> cond_proj (layers.k.cond_layers.1 is the same tensor
              registered twice upstream: checked equal and dropped)

Model configs are inferred from the tensor shapes and, where shapes cannot tell (image size,
attention heads, dropout, encoder depth), from ``hyper_parameters`` with upstream's defaults.
Every model is loaded with ``strict=True``; a missing or unexpected key is a ``ValueError``
naming it.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from ipl_diffusion.errors import UserError, UserFileExistsError, UserFileNotFoundError
from ipl_diffusion.models import DiffAEUNetModel, LatentNetModel, SemanticEncoder

__all__ = [
    "load_upstream_checkpoint",
    "convert_unet_state_dict",
    "convert_encoder_state_dict",
    "convert_latent_net_state_dict",
    "infer_unet_config",
    "infer_encoder_config",
    "infer_latent_net_config",
    "diffae_models_from_state_dict",
    "convert_diffae_checkpoint",
]

# Globals that may be stubbed: bookkeeping of Lightning, numpy scalars in hyper-parameters,
# upstream DiffAE's config enums. Their stubs carry no behaviour.
STUBBABLE_PREFIXES = (
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "numpy.",
    "choices.",
    "config.",
    "config_base.",
    "argparse.Namespace",
)

_RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "cond_emb_layers.1": "cond_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_ATTENTION_PARTS = ("norm", "qkv", "proj_out")


# ----------------------------------------------------------------------------- safe loading
def _inert_stub(full_path: str) -> type:
    module, _, name = full_path.rpartition(".")

    class _Stub:
        """Stand-in for a pickled global we do not trust or need; accepts and ignores everything."""

        def __init__(self, *args, **kwargs):
            pass

        def __setstate__(self, state):
            pass

        def __reduce__(self):  # never re-pickle a stub as if it were the real thing
            raise TypeError(f"stub for {full_path} cannot be pickled")

    _Stub.__name__ = _Stub.__qualname__ = f"Stub[{name}]"
    _Stub.__module__ = __name__
    _Stub.stub_for = full_path
    return _Stub


def load_upstream_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """Read an upstream ``.ckpt`` / ``.pt`` safely (see the module docstring) onto the CPU.

    Returns the loaded dict (``state_dict`` inside, or the file's own state dict if it is a
    bare one). ``.safetensors`` files are read with safetensors.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the pickle references code we refuse to stub, or the file is not a torch
            checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"DiffAE checkpoint '{path}' does not exist (expected an upstream last.ckpt)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {"state_dict": load_file(str(path))}
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # not a zip-format torch file
        raise UserError(f"'{path}' is not a readable PyTorch checkpoint: {err}") from err
    refused = [g for g in unsafe if not g.startswith(STUBBABLE_PREFIXES)]
    if refused:
        raise UserError(
            f"'{path}' references {', '.join(sorted(refused))}, which is neither tensor data nor "
            "Lightning bookkeeping; refusing to unpickle it (weights_only=True). If you trust the file, "
            "re-save its 'state_dict' with safetensors and convert that."
        )
    stubs = [(_inert_stub(g), g) for g in unsafe]
    try:
        with torch.serialization.safe_globals(stubs):
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise UserError(f"cannot read '{path}' safely: {err}") from err
    if not isinstance(checkpoint, dict):
        raise UserError(f"'{path}' holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


# ----------------------------------------------------------------------------- key mapping
def _split_qkv(weight: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Upstream QKVAttentionLegacy: rows are [q_h, k_h, v_h] per head h, each of C / heads rows.
    three_c = weight.shape[0]
    channels = three_c // 3
    rest = weight.shape[1:]
    per_head = weight.reshape(num_heads, 3, channels // num_heads, *rest)
    return tuple(per_head[:, j].reshape(channels, *rest) for j in range(3))


def _attention(prefix: str, part: str, tail: str, tensor: torch.Tensor, num_heads: int, out: dict) -> None:
    if part == "norm":
        out[f"{prefix}.group_norm.{tail}"] = tensor
    elif part == "proj_out":
        out[f"{prefix}.to_out.0.{tail}"] = tensor.reshape(tensor.shape[0], -1) if tail == "weight" else tensor
    else:  # qkv
        if tail == "weight":
            tensor = tensor.reshape(tensor.shape[0], -1)
        for name, piece in zip(("to_q", "to_k", "to_v"), _split_qkv(tensor, num_heads)):
            out[f"{prefix}.{name}.{tail}"] = piece.contiguous()


def _resblock(prefix: str, rest: str, tensor: torch.Tensor, out: dict, key: str) -> None:
    for upstream, ours in _RESBLOCK.items():
        if rest.startswith(upstream + "."):
            out[f"{prefix}.{ours}.{rest[len(upstream) + 1:]}"] = tensor
            return
    raise UserError(f"unexpected resblock key '{key}'")


def _layer_entry(prefix: str, rest: str, tensor, num_heads: int, out: dict, key: str, position_names) -> None:
    """``rest`` = ``"{j}.{...}"`` inside one upstream TimestepEmbedSequential."""
    j, _, sub = rest.partition(".")
    part, _, tail = sub.rpartition(".")
    if part in _ATTENTION_PARTS:
        _attention(f"{prefix}.attention", part, tail, tensor, num_heads, out)
        return
    name = position_names(int(j))
    if name is None:
        raise UserError(f"unexpected key '{key}'")
    _resblock(f"{prefix}.{name}", sub, tensor, out, key)


def _convert_trunk(state: Dict[str, torch.Tensor], num_heads: int, encoder: bool) -> Dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        if key.startswith("input_blocks.0.0."):
            out["conv_in." + key[len("input_blocks.0.0."):]] = tensor
        elif m := re.match(r"input_blocks\.(\d+)\.(.*)$", key):
            k = int(m.group(1))
            _layer_entry(f"down_blocks.{k - 1}", m.group(2), tensor, num_heads, out, key, lambda j: "resnet" if j == 0 else None)
        elif m := re.match(r"middle_block\.(\d)\.(.*)$", key):
            j, sub = int(m.group(1)), m.group(2)
            part, _, tail = sub.rpartition(".")
            if j == 1 and part in _ATTENTION_PARTS:
                _attention("mid_block.attention", part, tail, tensor, num_heads, out)
            elif j in (0, 2):
                _resblock(f"mid_block.resnet_{1 if j == 0 else 2}", sub, tensor, out, key)
            else:
                raise UserError(f"unexpected key '{key}'")
        elif not encoder and (m := re.match(r"output_blocks\.(\d+)\.(.*)$", key)):
            k = int(m.group(1))
            _layer_entry(f"up_blocks.{k}", m.group(2), tensor, num_heads, out, key, lambda j: "resnet" if j == 0 else "resample")
        elif key.startswith("out.0."):
            out["norm_out." + key[len("out.0."):]] = tensor
        elif key.startswith("out.3." if encoder else "out.2."):
            out["conv_out." + key[len("out.3."):]] = tensor
        elif not encoder and key.startswith("time_embed.time_embed."):
            index, _, tail = key[len("time_embed.time_embed."):].partition(".")
            names = {"0": "linear_1", "2": "linear_2"}
            if index not in names:
                raise UserError(f"unexpected key '{key}'")
            out[f"time_embedding.{names[index]}.{tail}"] = tensor
        else:
            raise UserError(f"unexpected {'encoder' if encoder else 'UNet'} key '{key}'")
    return out


def convert_unet_state_dict(state: Dict[str, torch.Tensor], num_heads: int = 1) -> Dict[str, torch.Tensor]:
    """Upstream UNet keys (prefix stripped, no ``encoder.`` / ``latent_net.``) -> :class:`DiffAEUNetModel` keys."""
    return _convert_trunk(state, num_heads, encoder=False)


def convert_encoder_state_dict(state: Dict[str, torch.Tensor], num_heads: int = 1) -> Dict[str, torch.Tensor]:
    """Upstream ``encoder.*`` keys (``encoder.`` stripped) -> :class:`SemanticEncoder` keys."""
    return _convert_trunk(state, num_heads, encoder=True)


def convert_latent_net_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Upstream ``latent_net.*`` keys (stripped) -> :class:`LatentNetModel` keys (shared tensor de-duplicated)."""
    out = {}
    for key, tensor in state.items():
        if m := re.match(r"time_embed\.([02])\.(weight|bias)$", key):
            out[f"time_embedding.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"] = tensor
        elif m := re.match(r"layers\.(\d+)\.(linear|norm|linear_emb)\.(weight|bias)$", key):
            name = "cond_proj" if m.group(2) == "linear_emb" else m.group(2)
            out[f"layers.{m.group(1)}.{name}.{m.group(3)}"] = tensor
        elif m := re.match(r"layers\.(\d+)\.cond_layers\.1\.(weight|bias)$", key):
            twin = state.get(f"layers.{m.group(1)}.linear_emb.{m.group(2)}")
            if twin is None or not torch.equal(twin, tensor):
                raise UserError(f"'{key}' should be the same tensor as its linear_emb twin, and is not")
        else:
            raise UserError(f"unexpected latent_net key '{key}'")
    return out


# ----------------------------------------------------------------------------- configs
def _indices(state, pattern: str):
    return sorted({int(m.group(1)) for key in state if (m := re.match(pattern, key))})


def _has(state, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state)


def infer_unet_config(state: Dict[str, torch.Tensor], hparams: Optional[dict] = None) -> dict:
    """:class:`DiffAEUNetModel` config from upstream UNet tensors (+ ``hyper_parameters``)."""
    hparams = hparams or {}
    try:
        base = state["input_blocks.0.0.weight"].shape[0]
        embed = state["time_embed.time_embed.0.weight"].shape[0]
        z_channels = state["output_blocks.0.0.cond_emb_layers.1.weight"].shape[1]
    except KeyError as err:
        raise UserError(f"not an upstream DiffAE autoencoder state dict: missing {err}") from err
    outputs = _indices(state, r"output_blocks\.(\d+)\.")
    ups = [k for k in outputs if _has(state, f"output_blocks.{k}.1.in_layers") or _has(state, f"output_blocks.{k}.2.in_layers")]
    per_level = ups[0] + 1 if ups else len(outputs)
    levels = len(outputs) // per_level
    image_size = int(hparams.get("img_size", 256))
    mult, attention = [], []
    for level in range(levels):
        k = (levels - 1 - level) * per_level
        width = state[f"output_blocks.{k}.0.in_layers.2.weight"].shape[0]
        if width % base:
            raise UserError(f"level {level} width {width} is not a multiple of the base width {base}")
        mult.append(width // base)
        if _has(state, f"output_blocks.{k}.1.qkv"):
            attention.append(image_size // 2**level)
    return dict(
        sample_size=image_size,
        in_channels=state["input_blocks.0.0.weight"].shape[1],
        out_channels=state["out.2.weight"].shape[0],
        model_channels=base,
        channel_mult=tuple(mult),
        num_res_blocks=per_level - 1,
        attention_resolutions=tuple(attention),
        num_attention_heads=int(hparams.get("net_beatgans_attn_head", 1)),
        dropout=float(hparams.get("dropout", 0.1)),
        embed_channels=embed,
        z_sem_channels=z_channels,
    )


def _encoder_layout_fits(state: Dict[str, torch.Tensor], blocks: int, res_blocks: int) -> bool:
    """Whether ``blocks`` encoder blocks can be levels of ``res_blocks`` resnets + one down-resnet."""
    if blocks % (res_blocks + 1):
        return False
    level_attention = {}
    for k in range(1, blocks):
        index, level = (k - 1) % (res_blocks + 1), (k - 1) // (res_blocks + 1)
        conv = state.get(f"input_blocks.{k}.0.in_layers.2.weight")
        if conv is None:
            return False
        has_attention = _has(state, f"input_blocks.{k}.1.")
        shortcut = _has(state, f"input_blocks.{k}.0.skip_connection.")
        if index == res_blocks:  # down-resnet: keeps the width, no attention
            if shortcut or has_attention or conv.shape[0] != conv.shape[1]:
                return False
        else:  # only a level's first resnet may change the width
            if index > 0 and (shortcut or conv.shape[0] != conv.shape[1]):
                return False
            if level_attention.setdefault(level, has_attention) != has_attention:
                return False
    return True


def infer_encoder_config(state: Dict[str, torch.Tensor], hparams: Optional[dict] = None) -> dict:
    """:class:`SemanticEncoder` config from upstream ``encoder.*`` tensors (+ ``hyper_parameters``).

    The number of resnets per level comes from ``hyper_parameters["net_enc_num_res_blocks"]``
    or, without it, from the one block layout the tensors fit (upstream's default 2 if several do).
    """
    hparams = hparams or {}
    base = state["input_blocks.0.0.weight"].shape[0]
    blocks = len(_indices(state, r"input_blocks\.(\d+)\."))
    if "net_enc_num_res_blocks" in hparams:
        res_blocks = int(hparams["net_enc_num_res_blocks"])
        if not _encoder_layout_fits(state, blocks, res_blocks):
            raise UserError(f"the encoder's {blocks} blocks do not fit net_enc_num_res_blocks={res_blocks}")
    else:
        fits = [n for n in range(1, blocks) if _encoder_layout_fits(state, blocks, n)]
        if not fits:
            raise UserError(f"cannot infer the encoder's layout from its {blocks} blocks")
        res_blocks = fits[0] if len(fits) == 1 else (2 if 2 in fits else None)
        if res_blocks is None:
            raise UserError(
                f"the encoder's {blocks} blocks fit {fits} resnets per level; "
                "give hyper_parameters['net_enc_num_res_blocks']"
            )
    levels = blocks // (res_blocks + 1)
    image_size = int(hparams.get("img_size", 256))
    mult, attention = [], []
    for level in range(levels):
        k = 1 + level * (res_blocks + 1)
        mult.append(state[f"input_blocks.{k}.0.in_layers.2.weight"].shape[0] // base)
        if _has(state, f"input_blocks.{k}.1.qkv"):
            attention.append(image_size // 2**level)
    return dict(
        sample_size=image_size,
        in_channels=state["input_blocks.0.0.weight"].shape[1],
        model_channels=base,
        channel_mult=tuple(mult),
        num_res_blocks=res_blocks,
        attention_resolutions=tuple(attention),
        num_attention_heads=int(hparams.get("net_beatgans_attn_head", 1)),
        z_sem_channels=state["out.3.weight"].shape[0],
    )


def infer_latent_net_config(state: Dict[str, torch.Tensor], hparams: Optional[dict] = None) -> dict:
    """:class:`LatentNetModel` config from upstream ``latent_net.*`` tensors (+ ``hyper_parameters``)."""
    hparams = hparams or {}
    layers = _indices(state, r"layers\.(\d+)\.linear\.weight")
    channels = state["layers.0.linear.weight"].shape[1]
    hidden = state["layers.0.linear.weight"].shape[0]
    skip = tuple(
        i for i in layers[1:] if state[f"layers.{i}.linear.weight"].shape[1] == hidden + channels
    )
    return dict(
        num_channels=channels,
        num_hid_channels=hidden,
        num_layers=len(layers),
        skip_layers=skip,
        num_time_emb_channels=state["time_embed.0.weight"].shape[1],
        condition_bias=float(hparams.get("net_latent_condition_bias", 1.0)),
    )


# ----------------------------------------------------------------------------- conversion
def _strict_load(model, state: Dict[str, torch.Tensor], what: str) -> None:
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {result.missing_keys[:8]}{' ...' if len(result.missing_keys) > 8 else ''}")
    if result.unexpected_keys:
        problems.append(f"unexpected {result.unexpected_keys[:8]}")
    if problems:
        raise UserError(f"the {what} weights do not match the inferred architecture: {'; '.join(problems)}")


def _load(model_cls, config: dict, state: Dict[str, torch.Tensor], what: str):
    model = model_cls(**config)
    try:
        _strict_load(model, state, what)
    except RuntimeError as err:  # size mismatch
        raise UserError(f"the {what} weights do not match the inferred architecture: {err}") from err
    return model.eval()


def diffae_models_from_state_dict(
    state_dict: Dict[str, torch.Tensor],
    hparams: Optional[dict] = None,
    prefix: str = "ema_model.",
) -> dict:
    """Build our models from an upstream ``LitModel`` state dict.

    Returns ``{"unet", "semantic_encoder", "latent_net" (or None)}``, loaded strictly, in eval mode.

    Raises:
        ValueError: no ``prefix`` weights, keys that are not upstream DiffAE keys, or tensors
            that do not fit the inferred architecture (the message names them).
    """
    hparams = hparams or {}
    unet, encoder, latent = {}, {}, {}
    stats = {}
    for key, tensor in state_dict.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if rest.startswith("encoder."):
                encoder[rest[len("encoder."):]] = tensor
            elif rest.startswith("latent_net."):
                latent[rest[len("latent_net."):]] = tensor
            else:
                unet[rest] = tensor
        elif key in ("conds_mean", "conds_std"):
            stats[key] = tensor
        elif key == "x_T" or key.startswith(("model.", "ema_model.")):
            continue  # logging noise buffer; the other copy of the weights
        else:
            raise UserError(f"unexpected top-level key '{key}' in the DiffAE state dict")
    if not unet:
        raise UserError(f"no '{prefix}*' weights in the state dict; is this an upstream DiffAE checkpoint?")
    heads = int(hparams.get("net_beatgans_attn_head", 1))
    models = {
        "unet": _load(DiffAEUNetModel, infer_unet_config(unet, hparams), convert_unet_state_dict(unet, heads), "UNet"),
        "semantic_encoder": _load(
            SemanticEncoder, infer_encoder_config(encoder, hparams), convert_encoder_state_dict(encoder, heads), "encoder"
        ) if encoder else None,
        "latent_net": None,
    }
    if models["semantic_encoder"] is None:
        raise UserError("the checkpoint has no semantic encoder weights ('encoder.*'); not a DiffAE autoencoder")
    if latent:
        converted = convert_latent_net_state_dict(latent)
        if stats:
            if set(stats) != {"conds_mean", "conds_std"}:
                raise UserError(f"need both conds_mean and conds_std; got {sorted(stats)}")
            converted["conds_mean"] = stats["conds_mean"].reshape(-1)
            converted["conds_std"] = stats["conds_std"].reshape(-1)
        else:
            # Without statistics the latent net samples in raw z_sem space (identity normalisation).
            base = LatentNetModel(**infer_latent_net_config(latent, hparams))
            converted["conds_mean"], converted["conds_std"] = base.conds_mean, base.conds_std
        models["latent_net"] = _load(LatentNetModel, infer_latent_net_config(latent, hparams), converted, "latent_net")
    return models


def convert_diffae_checkpoint(
    checkpoint_path: Union[str, os.PathLike],
    output_dir: Union[str, os.PathLike],
    prefix: str = "ema_model.",
    image_size: Optional[int] = None,
    overwrite: bool = False,
):
    """Convert an upstream DiffAE ``last.ckpt`` into a :class:`DiffAEPipeline` folder.

    Args:
        checkpoint_path: upstream Lightning checkpoint (``ffhq256_autoenc/last.ckpt`` or
            ``ffhq256_autoenc_latent/last.ckpt``, which adds the latent DDIM), or a ``.safetensors``
            of its ``state_dict``.
        output_dir: folder to write (``model_index.json``, one sub-folder per component,
            safetensors weights); load it with ``DiffAEPipeline.from_pretrained(output_dir)``.
        prefix: ``"ema_model."`` (the EMA weights upstream samples with) or ``"model."``.
        image_size: training resolution when the checkpoint has no ``hyper_parameters``
            (default 256); it places the attention layers and sets the pipeline's image size.
        overwrite: allow writing into a non-empty ``output_dir``.

    Returns:
        The converted :class:`DiffAEPipeline` (CPU, eval mode).

    Raises:
        FileNotFoundError: missing checkpoint. FileExistsError: non-empty ``output_dir``.
        UserError: ``output_dir`` is not writable (checked before the checkpoint is read).
        ValueError: unsafe pickle, wrong keys or shapes (named in the message).
    """
    from ipl_diffusion.outputs import check_writable
    from ipl_diffusion.pipelines.pipeline_diffae import DiffAEPipeline, default_latent_scheduler, diffae_scheduler

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise UserFileExistsError(f"output folder '{output_dir}' is not empty; pass overwrite=True (--overwrite)")
    check_writable(output_dir, "output folder")  # before a checkpoint of gigabytes is read
    checkpoint = load_upstream_checkpoint(checkpoint_path)
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not all(torch.is_tensor(v) for v in state_dict.values()):
        raise UserError(f"'{checkpoint_path}': 'state_dict' holds non-tensor values")
    raw_hparams = checkpoint.get("hyper_parameters")
    # Plain values only: anything unpickled as an inert stub (numpy scalars, enums) is unusable.
    plain = (int, float, str, bool, list, tuple, dict, type(None))
    hparams = {k: v for k, v in (raw_hparams if isinstance(raw_hparams, dict) else {}).items() if isinstance(v, plain)}
    if image_size is not None:
        hparams["img_size"] = int(image_size)
    if hparams.get("beta_scheduler", "linear") != "linear":
        raise UserError(f"only DiffAE's linear beta schedule is supported; got {hparams['beta_scheduler']!r}")
    models = diffae_models_from_state_dict(state_dict, hparams, prefix)
    scheduler = diffae_scheduler()
    if int(hparams.get("T", 1000)) != scheduler.config.num_train_timesteps:
        scheduler = type(scheduler).from_config(scheduler.config, num_train_timesteps=int(hparams["T"]))
    pipe = DiffAEPipeline(
        semantic_encoder=models["semantic_encoder"],
        unet=models["unet"],
        scheduler=scheduler,
        latent_net=models["latent_net"],
        latent_scheduler=default_latent_scheduler() if models["latent_net"] is not None else None,
    )
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return pipe
