"""Upstream checkpoints -> our ``save_pretrained`` folders (safetensors + JSON).

* :func:`convert_diffae_checkpoint` (:mod:`.diffae`): DiffAE Lightning ``last.ckpt`` -> ``DiffAEPipeline`` folder.
* :func:`convert_stylegan2_checkpoint` (:mod:`.stylegan2`): rosinality ``.pt`` -> ``StyleGAN2Generator`` folder.

Both read upstream files with ``torch.load(weights_only=True)`` and never run pickled code.
The names are imported lazily so that converting one family does not import the other.
"""

import importlib

_LAZY = {
    "convert_diffae_checkpoint": "ipl_diffusion.conversion.diffae",
    "convert_stylegan2_checkpoint": "ipl_diffusion.conversion.stylegan2",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ipl_diffusion.conversion' has no attribute {name!r}")
