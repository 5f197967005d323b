"""What every IPL pipeline (Diff-IPL, GAN-IPL) does the same way: image I/O through the
project's one preprocessing path, the sample grid and model card saved beside the weights, and
Hub pushes of that folder (whose code files let plain diffusers load it, see
:mod:`ipl_diffusion.pipelines.hub_layout`)."""

import contextlib
import tempfile
from pathlib import Path
from typing import Optional

import torch
from diffusers.utils import hub_utils
from ipl_diffusion.errors import UserError
from ipl_diffusion.images import postprocess_images, prepare_images

SAMPLE_GRID_NAME = "sample_grid.png"
MODEL_CARD_NAME = "README.md"


class AdaptedPipelineMixin:
    """Shared by :class:`IPLPipeline` and :class:`StyleGANIPLPipeline`; precedes
    ``DiffusionPipeline`` in the bases. Subclasses provide ``image_size`` (pixels) and
    ``model_card(repo_id) -> huggingface_hub.ModelCard``, and keep a PIL ``sample_grid`` (or ``None``)."""

    def check_known_domains(self, *labels: str) -> None:
        """``ValueError`` for a label outside ``config.known_domains``.

        A CLIP trained on a closed set of domains (the shipped Shapes CLIP) gives meaningless
        directions for any other text, so such a pipeline records the domains it knows; a
        pipeline built on an open-vocabulary CLIP records none and accepts any label.
        """
        known = self.config.get("known_domains")
        if not known:
            return
        from ipl_diffusion.shapes import meant_domain

        for label in labels:
            if label.strip().lower() not in {d.lower() for d in known}:
                close = meant_domain(label, known)
                raise UserError(
                    f"this pipeline's CLIP was trained only on the domains {', '.join(known)}; "
                    f"{label!r} is not one of them{f' (did you mean {close!r}?)' if close else ''}. Use one of them, or build the pipeline on an "
                    "open-vocabulary CLIP: from_components(<generator>, text_encoder=\"openai/clip-vit-base-patch32\") "
                    "(ipl adapt --clip_model openai/clip-vit-base-patch32)"
                )

    @staticmethod
    @contextlib.contextmanager
    def guard_output_dir(output_dir, resume_from_checkpoint=None, overwrite: bool = False):
        """Around an ``adapt`` run writing into ``output_dir`` (``None``: no-op): refuse a folder
        that cannot be written before any work, hold its run lock
        (:func:`ipl_diffusion.outputs.output_lock`) so a second run into it is refused at once,
        and check its checkpoints (:func:`ipl_diffusion.checkpointing.check_before_run`;
        ``overwrite``: earlier ones are allowed, and replaced later, once the run's own checks
        have passed).

        Raises:
            UserError: ``output_dir`` is not writable, another live run holds it, or the
                checkpoint to resume from does not match its recorded digests.
            ValueError / FileNotFoundError: see ``check_before_run``.
        """
        from ipl_diffusion.checkpointing import check_before_run
        from ipl_diffusion.outputs import check_writable, output_lock

        if output_dir is not None:
            check_writable(output_dir, "output_dir")
        with output_lock(output_dir, "output_dir"):
            if output_dir is not None:
                check_before_run(Path(output_dir) / "checkpoints", resume_from_checkpoint, overwrite=overwrite)
            yield

    def load_sample_grid(self, folder) -> None:
        """Set ``sample_grid`` from ``folder/sample_grid.png`` when a saved pipeline has one."""
        grid = Path(folder) / SAMPLE_GRID_NAME
        if grid.is_file():
            from PIL import Image

            with Image.open(grid) as image:
                self.sample_grid = image.convert("RGB")

    def preprocess(self, images) -> torch.Tensor:
        """Images -> ``(B, 3, S, S)`` float32 in ``[-1, 1]`` on the pipeline's device
        (:func:`ipl_diffusion.images.prepare_images`, the project's one input path)."""
        return prepare_images(images, self.image_size, self.device)

    @staticmethod
    def postprocess(images: torch.Tensor, output_type: str = "pil"):
        """``(B, 3, H, W)`` in ``[-1, 1]`` -> ``output_type``
        (:func:`ipl_diffusion.images.postprocess_images`, diffusers' ``VaeImageProcessor``)."""
        return postprocess_images(images, output_type)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' ``save_pretrained`` (in the layout of :mod:`ipl_diffusion.pipelines.hub_layout`), plus
        ``sample_grid.png`` (the adaptation run's grid) and ``README.md``, the model card whose
        usage snippet loads ``save_directory``."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if self.sample_grid is not None:
            self.sample_grid.save(Path(save_directory) / SAMPLE_GRID_NAME)
        self.model_card(str(save_directory)).save(Path(save_directory) / MODEL_CARD_NAME)
        return result

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        **kwargs,
    ) -> str:
        """Upload the pipeline as :meth:`save_pretrained` writes it, with the card for ``repo_id``.

        Uploads one folder: ``model_index.json``, every component folder (safetensors + JSON,
        with the code files of :mod:`ipl_diffusion.pipelines.hub_layout`), the pipeline's code file,
        ``sample_grid.png`` and ``README.md`` (:meth:`model_card` of ``repo_id``). Goes through
        ``diffusers.utils.hub_utils`` (``create_repo``, ``upload_folder``) like diffusers' own
        ``push_to_hub``. Returns what ``upload_folder`` returns (the commit URL).
        """
        repo_id = hub_utils.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            self.model_card(repo_id).save(Path(folder) / MODEL_CARD_NAME)
            return self._upload_folder(
                folder,
                repo_id,
                token=token,
                commit_message=commit_message or f"Upload {type(self).__name__}",
                create_pr=create_pr,
            )
