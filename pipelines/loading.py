"""Loading a pipeline folder or Hub id with errors a user can act on.

diffusers' ``DiffusionPipeline.from_pretrained`` reports a missing component sub-folder deep
inside loading, and with ``HF_HUB_OFFLINE=1`` set after ``huggingface_hub`` was imported it
still tries the network. Our pipelines check first and fail at once.

A Hub id is fetched with ``huggingface_hub.snapshot_download`` and then loaded as a local
folder: diffusers' own download step would treat the code files of
:mod:`ipl_diffusion.pipelines.hub_layout` as code to run and ask for ``trust_remote_code``, which our
classes never need.
"""

import json
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable

from ipl_diffusion.clip_loading import hub_offline, looks_like_local_path
from ipl_diffusion.errors import UserError, UserFileNotFoundError


# model_index.json "_class_name" of our pipelines -> the generator family (``ipl --backend``)
# whose pipeline loads it, and that family's loading class.
BACKEND_OF_CLASS = {"IPLPipeline": "diffae", "DiffAEPipeline": "diffae", "StyleGANIPLPipeline": "stylegan2"}
LOADER_OF_BACKEND = {"diffae": "IPLPipeline", "stylegan2": "StyleGANIPLPipeline"}


def pipeline_family(folder) -> tuple[str, str] | None:
    """``(class name with its article, generator family)`` of a local folder holding one of our
    pipelines, e.g. ``("an IPLPipeline", "diffae")``; None for other folders, and for a missing or
    unreadable ``model_index.json`` (loading the pipeline reports those)."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return None
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (ValueError, AttributeError):
        return None
    if isinstance(class_name, list) and class_name:  # [module, class]: diffusers' custom-code layout
        class_name = class_name[-1]
    if not isinstance(class_name, str):
        return None
    family = BACKEND_OF_CLASS.get(class_name)
    if family is None:
        return None
    return f"{'an' if class_name[0] in 'AEIOU' else 'a'} {class_name}", family


def is_generator_folder(folder, class_name: str = "StyleGAN2Generator") -> bool:
    """Whether ``folder`` holds a bare model saved by ``save_pretrained`` whose config names
    ``class_name`` (and no pipeline index): ``ipl convert stylegan2`` output. JSON only, so the
    CLI can ask before torch is imported."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "model_index.json").is_file():
        return False
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name") == class_name
    except (OSError, ValueError, AttributeError):
        return False


def check_pipeline_folder(path: str, components: Iterable[str], overrides: dict, backend: str | None = None) -> None:
    """Raise unless ``path`` holds ``model_index.json`` and a sub-folder for every component it
    lists (except those passed as objects in ``overrides``).

    Raises:
        UserFileNotFoundError: (a ``FileNotFoundError``) no ``model_index.json``, or component
            folders missing (named).
        UserError: ``model_index.json`` is not JSON; or, with ``backend`` (``"diffae"`` / ``"stylegan2"``) given, the folder holds a
            pipeline of the other generator family; the message names the class that loads it.
    """
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise UserFileNotFoundError(f"{path} is not a pipeline folder: model_index.json is missing")
    try:
        entries = json.loads(index.read_text())
    except ValueError as err:  # json's error; a truncated copy or a file that was never a pipeline index
        raise UserError(f"{index} is not valid JSON ({err}); copy the folder written by save_pretrained again") from None
    if not isinstance(entries, dict):
        raise UserError(f"{index} does not hold a JSON object; it is not a pipeline index")
    found = pipeline_family(path) if backend is not None else None
    if found is not None and found[1] != backend:
        described, family = found
        raise UserError(
            f"{path} holds {described} (a {family} generator); load it with "
            f"{LOADER_OF_BACKEND[family]}.from_pretrained (ipl --backend {family})"
        )
    missing = [
        name
        for name in components
        if isinstance(entries.get(name), list)
        and entries[name][0] is not None
        and name not in overrides
        and not (Path(path) / name).is_dir()
    ]
    if missing:
        hint = "copy them in, or pass the component objects to from_pretrained"
        from ipl_diffusion.shapes import CLIP_COMPONENTS  # the error path only: no torch at import

        if set(missing) <= set(CLIP_COMPONENTS):
            # Most often a copy of a shipped Shapes folder, which keeps its CLIP in shapes_models/clip.
            hint = ("pass them to from_pretrained (**clip_components(CLIP), from ipl_diffusion.pipelines.loading) or give "
                    "`--clip_model CLIP` to ipl adapt / examples/train_ipl_diffae.py; a copy of a shipped Shapes folder "
                    "takes CLIP = ipl_diffusion/shapes_models/clip, or load the shipped folder itself "
                    "(ipl_diffusion.shapes.default_model_path)")
        raise UserFileNotFoundError(
            f"{path}: component folder(s) {', '.join(missing)} missing (listed in model_index.json); {hint}"
        )


def load_pipeline(load: Callable, path: str, components: Iterable[str], kwargs: dict, backend: str | None = None):
    """``load(folder, **kwargs)`` (a ``DiffusionPipeline.from_pretrained``) for a local folder or
    the snapshot of a Hub id, turning what can go wrong into a ``UserError`` naming what is
    missing (``UserFileNotFoundError``, a ``FileNotFoundError``, for a missing folder or file).

    A Hub id is resolved from the local cache only when ``HF_HUB_OFFLINE=1`` (read at call
    time), so an uncached id fails immediately instead of waiting on the network.

    A shipped Shapes folder (inside ``ipl_diffusion.shapes.MODELS_DIR``) stores no CLIP of its
    own: the components it leaves out, and the caller does not pass, come from the package's
    one copy (:func:`ipl_diffusion.shapes.shipped_clip_components`; a ``UserFileNotFoundError``
    when the package lacks it). Any other folder missing them fails the folder check.
    """
    # Imported here: the CLI imports this module for pipeline_family, before torch is loaded.
    from ipl_diffusion.shapes import shipped_clip_components

    if not os.path.isdir(path):
        path = hub_snapshot(path, kwargs)
    dtype = requested_dtype(kwargs)
    names = [name for name in components if name not in kwargs]
    kwargs.update(shipped_clip_components(path, {name: component_dtype(dtype, name) for name in names}))
    check_pipeline_folder(path, components, kwargs, backend)
    return load(path, **kwargs)


def requested_dtype(kwargs: dict):
    """The ``dtype`` a ``from_pretrained`` call asks for, read as diffusers reads it: ``dtype``,
    else its deprecated name ``torch_dtype`` (a ``dtype`` of None counts as not given); None
    when neither is given. ``kwargs`` is left as it is."""
    return kwargs.get("dtype") if kwargs.get("dtype") is not None else kwargs.get("torch_dtype")


def component_dtype(dtype, name: str):
    """The ``torch.dtype`` diffusers' ``from_pretrained(..., dtype=dtype)`` loads component
    ``name`` in, or None for "as saved" (``dtype`` not given).

    ``dtype``: a ``torch.dtype``; diffusers' per-component ``{name or "default": torch.dtype}``
    (a component it leaves out, with no "default", is float32); anything else (a string such
    as ``"float16"``) is float32, as diffusers loads it after its warning.
    """
    import torch

    if dtype is None:
        return None
    if isinstance(dtype, dict):
        return dtype.get(name, dtype.get("default", torch.float32))
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def hub_snapshot(repo_id: str, kwargs: dict) -> str:
    """The local folder of Hub repository ``repo_id`` (``huggingface_hub.snapshot_download``;
    from the cache only when ``HF_HUB_OFFLINE=1`` or ``local_files_only=True``). Pops the
    download options (``cache_dir``, ``revision``, ``token``, ``local_files_only``,
    ``force_download``) from ``kwargs``.

    Raises:
        UserFileNotFoundError: (a ``FileNotFoundError``) ``repo_id`` is not a Hub id (a missing local folder), or it is
            neither cached nor downloadable.
    """
    if looks_like_local_path(repo_id):
        # Asking the Hub about a local path would only answer with its repo-id naming rules.
        raise UserFileNotFoundError(f"pipeline folder {repo_id!r} does not exist")
    from huggingface_hub import snapshot_download

    options = {key: kwargs.pop(key) for key in ("cache_dir", "revision", "token", "force_download") if key in kwargs}
    offline = hub_offline() or bool(kwargs.pop("local_files_only", False))
    try:
        return snapshot_download(repo_id, local_files_only=offline, **options)
    except (OSError, ValueError) as err:  # huggingface_hub's not-found / HTTP / offline errors
        raise UserFileNotFoundError(
            f"cannot load pipeline {repo_id!r}: it is not a local folder and its model_index.json and "
            "component weights are not in the Hub cache"
            + (" (HF_HUB_OFFLINE=1 forbids downloading)" if offline else f" and could not be downloaded ({err})")
            + "; pass a local folder written by save_pretrained, or download it first with "
            f"`hf download {repo_id} --local-dir DIR`"
        ) from err


def clip_components(path_or_id, tokenizer=None, feature_extractor=None) -> dict:
    """A pipeline's CLIP components from one CLIP folder or Hub id, as keyword arguments of
    ``from_pretrained``: ``text_encoder`` (``CLIPModel``), ``tokenizer`` (``CLIPTokenizer``) and
    ``feature_extractor`` (``CLIPImageProcessorPil``; None, with a ``UserWarning``, where the
    folder has none, which means OpenAI CLIP's mean / std), the layout of ``save_pretrained`` of all three into one
    folder (``shapes_models/clip``, ``openai/clip-vit-base-patch32``). A ``tokenizer`` or
    ``feature_extractor`` given is kept instead of loaded. ``from_components`` and
    ``--clip_model`` (:func:`from_pretrained_with_clip`) read this.

    Raises:
        CLIPNotFoundError: (a ``FileNotFoundError``) the model or tokenizer cannot be loaded;
            the message names it and what is wrong (a missing folder, its files, the Hub).
        UserError: an empty name.
    """
    from transformers import CLIPModel, CLIPTokenizer

    from ipl_diffusion.clip_loading import load_clip_component

    model = load_clip_component(CLIPModel, path_or_id, "CLIP model")
    tokenizer = tokenizer or load_clip_component(CLIPTokenizer, path_or_id, "CLIP tokenizer")
    if feature_extractor is None:
        feature_extractor = _clip_image_processor(path_or_id)
    return {"text_encoder": model.eval(), "tokenizer": tokenizer, "feature_extractor": feature_extractor}


def _clip_image_processor(path_or_id):
    """The CLIP's ``CLIPImageProcessorPil``, or None with a ``UserWarning`` where it has none. None
    means OpenAI CLIP's mean / std (the processor's defaults): right for OpenAI's CLIPs, silently
    wrong for one trained with other statistics. A local folder's damaged file is an error
    (``load_clip_component`` names it); a Hub id's missing file shows only as a failed load."""
    from transformers import CLIPImageProcessorPil

    from ipl_diffusion.clip_loading import load_clip_component

    local = os.path.isdir(path_or_id)
    if not local or os.path.isfile(os.path.join(path_or_id, "preprocessor_config.json")):
        try:
            return load_clip_component(CLIPImageProcessorPil, path_or_id, "CLIP image processor")
        except FileNotFoundError:
            if local:
                raise
    unfetched = "" if local else ", or it could not be fetched"
    warnings.warn(f"CLIP {path_or_id} has no image processor (preprocessor_config.json{unfetched}): its images are normalised "
                  "with OpenAI CLIP's mean / std; save its CLIPImageProcessor there if it was trained with others",
                  UserWarning, stacklevel=4)
    return None


def from_pretrained_with_clip(cls, model, clip_model=None, **kwargs):
    """``cls.from_pretrained(model, **kwargs)`` with the CLIP components of ``clip_model`` (a
    CLIP folder or Hub id, :func:`clip_components`, its tokenizer checked against the model's
    vocabulary; None: the folder's own). The folder's ``known_domains`` describe its own CLIP,
    so with another CLIP the pipeline records none (any label is accepted) unless
    ``clip_model`` is the package's Shapes CLIP.

    Raises what :func:`clip_components`, ``check_tokenizer`` and ``cls.from_pretrained`` raise."""
    if clip_model is None:
        return cls.from_pretrained(str(model), **kwargs)
    from ipl_diffusion.clip_loading import check_tokenizer
    from ipl_diffusion.shapes import is_shipped

    components = clip_components(clip_model)
    check_tokenizer(components["tokenizer"], clip_model, components["text_encoder"].config.text_config.vocab_size)
    pipe = cls.from_pretrained(str(model), **components, **kwargs)
    if not is_shipped(clip_model):  # the one CLIP inside the package's Shapes models
        pipe.register_to_config(known_domains=None)
    return pipe
