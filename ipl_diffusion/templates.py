"""CLIP's ImageNet prompt templates (data).

Source: the 80 templates OpenAI published with CLIP for zero-shot ImageNet classification
(``notebooks/Prompt_Engineering_for_ImageNet.ipynb`` in ``openai/CLIP``). StyleGAN-NADA and the
released IPL code (``utils/text_templates.py``) ship the same list **minus one entry**,
``"a photo of many {}."``, i.e. 79 templates; they average over those 79 for the domain
regularisation target (Eq. 5) and for NADA's fixed text directions.

Shipped here:

* :data:`IMAGENET_TEMPLATES` -- all 80 (``templates="imagenet"``, our default);
* :data:`NADA_TEMPLATES` -- the 79 the reference code uses (``templates="nada"``, for exact
  reproduction of StyleGAN-NADA / IPL numbers);
* :data:`SINGLE_TEMPLATE` -- ``("a photo of a {}.",)`` (``templates="single"``).

Every template has exactly one ``{}`` placeholder for the domain label.
"""

from ipl_diffusion.errors import UserError

IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The reference code's list: CLIP's 80 without "a photo of many {}." (order kept).
NADA_TEMPLATES = tuple(t for t in IMAGENET_TEMPLATES if t != "a photo of many {}.")

SINGLE_TEMPLATE = ("a photo of a {}.",)

TEMPLATE_SETS = {
    "imagenet": IMAGENET_TEMPLATES,
    "nada": NADA_TEMPLATES,
    "single": SINGLE_TEMPLATE,
}


def get_templates(templates="imagenet"):
    """Resolve a template-set name (``"imagenet"``, ``"nada"``, ``"single"``) or a sequence of
    format strings to a tuple of strings, each with exactly one ``{}``.

    Raises:
        UserError: (a ``ValueError``) unknown set name, empty sequence, or a template without exactly one ``{}``.
    """
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise UserError(
                f"Unknown template set {templates!r}; expected one of {sorted(TEMPLATE_SETS)} "
                "or a sequence of format strings containing '{}'."
            )
        return TEMPLATE_SETS[templates]
    templates = tuple(templates)
    if not templates:
        raise UserError("The template sequence is empty.")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise UserError(f"Template {template!r} must be a string with exactly one '{{}}' placeholder.")
    return templates
