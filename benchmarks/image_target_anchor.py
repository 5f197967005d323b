#!/usr/bin/env python
"""Does Eq. 5's image anchor make label-less prompts point towards the style images?

With ``target_images`` and no label, IPL's prompts use the neutral word "style" as their target
token and Stage 1's domain regulariser (Eq. 5) pulls ``E_T([V_i] style)`` towards the image
estimate ``Norm(E_T(photo)) + mean Norm(E_I(style images)) - mean Norm(E_I(sources))``
(``ipl_diffusion/adaptation/image_target.py``). This trains Stage 1 on the shipped Shapes DiffAE's
pool (its recorded settings, seed 0) with that anchor and with the plain label feature
``E_T("style")``, and prints how the mean per-image direction ``ū`` (Eq. 8) of 16 source photos
aligns with the text direction photo -> sketch and with NADA's image direction ``d`` of 4
rendered sketches. Results: README, "Image-defined targets".

Usage::

    python benchmarks/image_target_anchor.py
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ipl_diffusion.adaptation import image_target  # noqa: E402
from ipl_diffusion.adaptation.diffae import encode_pool, run_stage1  # noqa: E402
from ipl_diffusion.clip_image import clip_image_features  # noqa: E402
from ipl_diffusion.clip_text import CLIPPromptEncoder  # noqa: E402
from ipl_diffusion.configs import resolve_configs  # noqa: E402
from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline  # noqa: E402
from ipl_diffusion.shapes import ShapesRenderer, default_model_path, source_images  # noqa: E402


def mean_direction(learner, z_sem):
    """``(Norm(ū) (D,), mean |u_i - ū|)`` of Eq. 8's unit directions photo -> "style"."""
    with torch.no_grad():
        src, tgt = learner.text_features(z_sem, "photo"), learner.text_features(z_sem, "style")
    u = F.normalize(F.normalize(tgt, dim=-1) - F.normalize(src, dim=-1), dim=-1)
    return F.normalize(u.mean(0), dim=0), float((u - u.mean(0)).norm(dim=-1).mean())


def main():
    pipe = IPLPipeline.from_pretrained(str(default_model_path()))
    features = clip_image_features(pipe.text_encoder, pipe.feature_extractor)
    encoder = CLIPPromptEncoder(pipe.text_encoder, pipe.tokenizer)
    stage1, _ = resolve_configs("diffae", pipe.config.get("adapt_defaults"), {})
    sources = source_images(16, seed=0)  # the Stage-2 photos of `ipl adapt --seed 0`
    style, _ = ShapesRenderer(32).sample(4, seed=4242, style="sketch")  # as benchmarks/main_job.py --style_images 4
    with torch.no_grad():
        goal, anchor = image_target.setup(encoder, features, style, features(sources), "photo", "style", False,
                                          stage1.label_templates)
        labels = {k: F.normalize(encoder.label_features(k, templates="imagenet"), dim=-1) for k in ("photo", "sketch")}
    text = F.normalize(labels["sketch"] - labels["photo"], dim=0)
    z_pool, f_pool = encode_pool(pipe.semantic_encoder, features, source_images(2048, seed=10_007), "cpu")
    z_sem = pipe.semantic_encoder(sources).detach()
    for name, a in (("Eq. 5 anchor = image estimate", anchor), ("Eq. 5 anchor = E_T('style')", None)):
        learner = run_stage1(encoder, z_pool, f_pool, "photo", "style", stage1, 0, progress=False, anchor=a)
        shared, spread = mean_direction(learner, z_sem)
        print(f"{name}: cos(ū, text photo->sketch) {float(shared @ text):.2f}, cos(ū, d) {float(shared @ goal.direction):.2f}, "
              f"mean |u_i - ū| {spread:.2f}, held-out retrieval {learner.heldout_retrieval:.2f}")
    print(f"cos(d, text photo->sketch) {float(goal.direction @ text):.2f}")


if __name__ == "__main__":
    main()
