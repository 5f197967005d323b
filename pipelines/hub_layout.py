"""The folder layout that lets plain diffusers load our pipelines, and the project's URL.

diffusers loads a pipeline whose classes live outside diffusers / transformers through
``DiffusionPipeline.from_pretrained(folder_or_id, trust_remote_code=True)`` when the folder
follows its "custom pipeline with custom components" layout:

* ``model_index.json`` names the pipeline as ``"_class_name": [<module>, <class>]`` and each
  custom component as ``"<component>": [<module>, <class>]``;
* ``<module>.py`` of the pipeline sits at the folder's root, that of a component in the
  component's own folder (``unet/diffae_unet.py``).

:class:`RemoteCodeLayoutMixin` writes that layout on ``save_pretrained`` (and so on every
push) for :class:`DiffAEPipeline`, :class:`IPLPipeline` and :class:`StyleGANIPLPipeline`.

The code files re-export the classes from the installed ``ipl-diffusion`` package rather than
carrying a copy of them: a pipeline's methods reach into most of the package (DDIM, image
I/O, projection, and ``adapt`` into the trainers, prompt learning and losses), and a copy would
also be a second class next to the package's own one. So loading with plain diffusers needs
``pip install ipl-diffusion``; without it the files raise an ``ImportError`` saying so.

Our own ``from_pretrained`` never runs those files: :meth:`RemoteCodeLayoutMixin.load_config`
maps the layout back to the package's classes, so ``IPLPipeline.from_pretrained`` loads a
folder written this way, or one written before it, without ``trust_remote_code``.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import json
from pathlib import Path
from typing import Optional

import ipl_diffusion
from ipl_diffusion.mapper import LatentMapper, SharedPromptContext
from ipl_diffusion.models import DiffAEUNetModel, LatentNetModel, SemanticEncoder, StyleGAN2Generator

DISTRIBUTION = "ipl-diffusion"
INSTALL_HINT = f"pip install {DISTRIBUTION}"

# Component classes of our pipelines that are defined in this package. Loading maps a
# ``[<module>, <class>]`` entry naming one of them back to the class itself, so only these
# names are trusted without ``trust_remote_code``.
PACKAGE_COMPONENTS = {
    cls.__name__: cls
    for cls in (DiffAEUNetModel, SemanticEncoder, LatentNetModel, StyleGAN2Generator, LatentMapper, SharedPromptContext)
}


def project_url() -> Optional[str]:
    """The project's home page: ``url`` of ``setup.cfg`` as the installed distribution's
    metadata records it (``Home-page``, else the first ``Project-URL``).

    A source checkout that is not installed, or whose installed metadata predates the URL,
    reads ``setup.cfg`` beside the package instead. ``None`` when neither has one.
    """
    try:
        metadata = importlib.metadata.metadata(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        metadata = None
    if metadata is not None:
        if metadata.get("Home-page"):
            return metadata["Home-page"]
        for entry in metadata.get_all("Project-URL") or []:
            return entry.split(",", 1)[-1].strip()
    setup_cfg = Path(ipl_diffusion.__file__).resolve().parents[1] / "setup.cfg"
    parser = configparser.ConfigParser()
    if parser.read(setup_cfg) and parser.get("metadata", "url", fallback=None):
        return parser.get("metadata", "url")
    return None


def _module_file(cls: type) -> str:
    """File stem of the code file for ``cls``: its module's last name (``diffae_unet``)."""
    return cls.__module__.rsplit(".", 1)[-1]


def code_file_text(cls: type) -> str:
    """Source of the code file that lets diffusers import ``cls`` (see the module docstring)."""
    url = project_url()
    where = f" ({url})" if url else ""
    return (
        f'"""{cls.__name__} of ipl-diffusion{where}, for diffusers\' custom-code loading:\n\n'
        f'    DiffusionPipeline.from_pretrained(<this repository>, trust_remote_code=True)\n\n'
        f"Written by ipl-diffusion {ipl_diffusion.__version__}. The class lives in the installed package: "
        f'{INSTALL_HINT}\n"""\n\n'
        "try:\n"
        f"    from {cls.__module__} import {cls.__name__}\n"
        "except ImportError as err:\n"
        "    raise ImportError(\n"
        f'        "this pipeline\'s code is the ipl-diffusion package, which is not installed: {INSTALL_HINT}{where}"\n'
        "    ) from err\n\n"
        f'__all__ = ["{cls.__name__}"]\n'
    )


def write_remote_code_layout(folder, pipeline) -> None:
    """Rewrite ``folder/model_index.json`` (just written by ``save_pretrained``) into diffusers'
    custom-code layout and write the code files it names (see the module docstring).

    Components of diffusers / transformers classes keep their ``[library, class]`` entries.
    """
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    pipeline_cls = type(pipeline)
    index["_class_name"] = [_module_file(pipeline_cls), pipeline_cls.__name__]
    (folder / f"{_module_file(pipeline_cls)}.py").write_text(code_file_text(pipeline_cls))
    for name, entry in index.items():
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] in PACKAGE_COMPONENTS):
            continue
        cls = PACKAGE_COMPONENTS[entry[1]]
        index[name] = [_module_file(cls), cls.__name__]
        (folder / name / f"{_module_file(cls)}.py").write_text(code_file_text(cls))
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def in_package_layout(config: dict) -> dict:
    """``model_index.json`` contents as the package's own classes load them: the pipeline's
    ``[module, class]`` becomes ``class`` and each component naming a class of
    :data:`PACKAGE_COMPONENTS` gets that class's module, so no code file of the folder runs.
    Entries naming any other class are left alone (diffusers then asks for
    ``trust_remote_code``). Changes ``config`` in place and returns it."""
    if isinstance(config.get("_class_name"), (list, tuple)):
        config["_class_name"] = config["_class_name"][-1]
    for name, entry in config.items():
        if name.startswith("_") or not isinstance(entry, (list, tuple)) or len(entry) != 2:
            continue
        if entry[1] in PACKAGE_COMPONENTS:
            config[name] = [PACKAGE_COMPONENTS[entry[1]].__module__, entry[1]]
    return config


class RemoteCodeLayoutMixin:
    """``save_pretrained`` writes diffusers' custom-code layout; ``load_config`` reads it back
    for the package's own classes. Precedes ``DiffusionPipeline`` in the bases."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' ``save_pretrained``, then the code files and ``model_index.json`` entries
        that let ``DiffusionPipeline.from_pretrained(save_directory, trust_remote_code=True)``
        load the folder (see :mod:`ipl_diffusion.pipelines.hub_layout`).

        ``push_to_hub=True`` (with ``repo_id``, ``token``, ``private``, ``commit_message``,
        ``create_pr``) uploads through :meth:`push_to_hub` after the folder is complete:
        diffusers' own upload would run before the layout is written.
        """
        push = kwargs.pop("push_to_hub", False)
        hub = {key: kwargs.pop(key) for key in ("repo_id", "token", "private", "commit_message", "create_pr") if key in kwargs}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code_layout(save_directory, self)
        if push:
            repo_id = hub.pop("repo_id", Path(save_directory).name)
            self.push_to_hub(repo_id, safe_serialization=kwargs.get("safe_serialization", True), variant=kwargs.get("variant"), **hub)
        return result

    @classmethod
    def load_config(cls, *args, **kwargs):
        loaded = super().load_config(*args, **kwargs)
        in_package_layout(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded
