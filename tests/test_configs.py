"""One name per option, from the command line to the checkpoint (ipl_diffusion.configs).

The configs are the single source of every option: `ipl adapt` and the training example
generate their flags from the fields, `pipe.adapt(**options)` takes the same names, a model's
recorded `adapt_defaults` override any field on both backends, and the one training loop
writes one log format and raises one exception type on a NaN.
"""

import ast
import csv
import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import CLIPImageProcessor

from ipl_diffusion.configs import DiffAEStage2Config, GANStage2Config, Stage1Config, resolve_configs
from ipl_diffusion.errors import NonFiniteLossError, UserError
from tiny_ipl import FAST, SIZE, build_tiny_ipl_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny latency-bound models (conftest.py)

REPO = Path(__file__).resolve().parents[1]
ALL_FIELDS = {f.name for cls in (Stage1Config, DiffAEStage2Config, GANStage2Config) for f in dataclasses.fields(cls)}
GAN_FAST = dict(stage1_num_images=4, stage1_iterations=2, stage1_batch_size=4, iterations=2, auto_layer_batch=2,
                num_sample_images=2, label_templates="single", progress=False)


@pytest.fixture
def gan_pipe(tiny_clip):
    from ipl_diffusion.models.stylegan2 import StyleGAN2Generator
    from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline

    torch.manual_seed(0)
    generator = StyleGAN2Generator(size=32, style_dim=16, n_mlp=2, channel_max=8).eval()
    clip, tokenizer = tiny_clip
    return StyleGANIPLPipeline.from_components(generator, clip, tokenizer, CLIPImageProcessor(), source_label="photo")


def adapt_parser():
    from ipl_diffusion.cli import build_parser

    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["adapt"]


def test_every_config_field_is_an_ipl_adapt_flag_under_its_own_name():
    flags = {s for action in adapt_parser()._actions for s in action.option_strings}
    missing = sorted(name for name in ALL_FIELDS if f"--{name}" not in flags)
    assert not missing, missing


def test_ipl_adapt_passes_only_the_options_given(monkeypatch, tmp_path):
    """Options not on the command line stay unset, so the model's recommended values apply."""
    import ipl_diffusion.cli.adapt as adapt_cli
    from ipl_diffusion.cli import main

    seen = {}

    class Stop(Exception):
        pass

    class FakePipeline:
        config = {"adapt_defaults": {}}

        def adapt(self, target, source=None, **kwargs):
            seen.update(kwargs)
            raise Stop

    monkeypatch.setattr(adapt_cli, "load_pipeline", lambda *args, **kwargs: FakePipeline())
    with pytest.raises(Stop):
        main(["adapt", "--backend", "stylegan2", "--target", "sketch", "--output_dir", str(tmp_path / "o"),
              "--ema_decay", "0.5", "--stage1-iterations", "7"])
    options = {k: v for k, v in seen.items() if k not in ("output_dir", "resume_from_checkpoint", "overwrite")}
    assert options == {"ema_decay": 0.5, "stage1_iterations": 7}


def test_model_adapt_defaults_override_any_field_and_the_caller_overrides_both(gan_pipe):
    recommended = {"ema_decay": 0.5, "clip_loss_weight": 0.7, "auto_layer_k": 1, "n_ctx": 3}
    stage1, stage2 = resolve_configs("stylegan2", recommended, {"clip_loss_weight": 2.0})
    assert (stage2.ema_decay, stage2.auto_layer_k, stage1.n_ctx) == (0.5, 1, 3)
    assert stage2.clip_loss_weight == 2.0  # the caller's value wins
    # Through the pipeline: fields the GAN pipeline used to hard-code in its signature.
    gan_pipe.register_to_config(adapt_defaults={"ema_decay": 0.5, "auto_layer_k": 1, "n_ctx": 3})
    adapted = gan_pipe.adapt("sketch", **GAN_FAST)
    config = adapted.adaptation_config
    assert config["stage2"]["ema_decay"] == 0.5 and config["stage2"]["auto_layer_k"] == 1
    assert config["stage1"]["n_ctx"] == 3 and adapted.mapper.config.n_ctx == 3


def test_a_misspelt_option_names_the_nearest_ones():
    pipe = build_tiny_ipl_pipeline()
    with pytest.raises(UserError, match="unknown adapt option 'learnig_rate'.*did you mean learning_rate"):
        pipe.adapt("sketch", learnig_rate=1e-3)
    with pytest.raises(UserError, match=r"unknown adapt option 't0' for the stylegan2 backend \(it is an option of --backend diffae\)"):
        resolve_configs("stylegan2", None, {"t0": 300})
    with pytest.raises(UserError, match="adapt_defaults name 'itrations'"):
        resolve_configs("diffae", {"itrations": 3}, {})


@pytest.mark.parametrize("scheme", ["manual", "random"])
def test_the_direction_regulariser_is_refused_for_a_scheme_stage1_does_not_train(scheme):
    """``--scheme manual --domain_regularizer direction`` would run plain NADA and record the
    regulariser in its config as if it had been used."""
    with pytest.raises(UserError, match=rf"domain_regularizer must be 'feature' with scheme '{scheme}'"):
        resolve_configs("stylegan2", None, {"scheme": scheme, "domain_regularizer": "direction"})
    assert Stage1Config(scheme=scheme).domain_regularizer == "feature"  # its default still builds
    for trained in ("adaptive", "learned"):
        assert Stage1Config(scheme=trained, domain_regularizer="direction").domain_regularizer == "direction"


class FixedPrompts:
    """A ready Stage-1 result: the same source / target feature for every latent."""

    def __init__(self, source, target):
        self.features = {"photo": source, "sketch": target}

    def text_features(self, latents, label):
        return self.features[label].expand(latents.shape[0], -1)


def test_a_given_prompt_learner_replaces_stage_one_on_both_backends(gan_pipe, monkeypatch):
    import ipl_diffusion.prompt_learning as prompt_learning

    def no_stage_one(*args, **kwargs):
        raise AssertionError("Stage 1 ran although a prompt learner was given")

    monkeypatch.setattr(prompt_learning, "learn_prompts", no_stage_one)
    pipe = build_tiny_ipl_pipeline()
    d = pipe.text_encoder.config.projection_dim
    source, target = torch.randn(1, d, generator=torch.Generator().manual_seed(1)).unbind(0)[0][None], torch.ones(1, d)
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    adapted = pipe.adapt("sketch", images=images, prompt_learner=FixedPrompts(source, target), **FAST)
    assert adapted.adaptation_config["stage1"]["heldout_retrieval"] is None
    gan_d = gan_pipe.text_encoder.config.projection_dim
    gan_adapted = gan_pipe.adapt("sketch", prompt_learner=FixedPrompts(torch.zeros(1, gan_d), torch.ones(1, gan_d)), **GAN_FAST)
    assert gan_adapted.generator is not None and gan_adapted.adaptation_config["stage1"]["heldout_images"] == 0


def test_both_backends_log_one_csv_format(gan_pipe, tmp_path):
    pipe = build_tiny_ipl_pipeline()
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pipe.adapt("sketch", images=images, output_dir=str(tmp_path / "diffae"), **FAST)
    gan_pipe.adapt("sketch", output_dir=str(tmp_path / "gan"), **GAN_FAST)
    for backend, iterations in (("diffae", FAST["iterations"]), ("gan", GAN_FAST["iterations"])):
        with open(tmp_path / backend / "losses.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert [int(r["step"]) for r in rows] == list(range(1, iterations + 1))
        assert {"loss", "grad_norm"} <= set(rows[0]), backend


def test_a_non_finite_loss_is_one_exception_type_in_both_stages_and_backends(gan_pipe, monkeypatch):
    import ipl_diffusion.losses as losses

    pipe = build_tiny_ipl_pipeline()
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    nan = lambda *args, **kwargs: torch.tensor(float("nan"), requires_grad=True)  # noqa: E731
    monkeypatch.setattr(losses, "adaptive_directional_loss", nan)  # Stage 2, both backends
    with pytest.raises(NonFiniteLossError, match="Stage 2 loss term directional is nan"):
        pipe.adapt("sketch", images=images, **FAST)
    with pytest.raises(NonFiniteLossError, match="GAN-IPL Stage 2 loss term directional is nan"):
        gan_pipe.adapt("sketch", **GAN_FAST)
    monkeypatch.setattr(losses, "contrastive_loss", nan)  # Stage 1
    import ipl_diffusion.prompt_learning as prompt_learning

    monkeypatch.setattr(prompt_learning, "contrastive_loss", nan)
    with pytest.raises(NonFiniteLossError, match="Stage 1 loss term L_contr is nan"):
        gan_pipe.adapt("sketch", **GAN_FAST)
    assert issubclass(NonFiniteLossError, UserError) and issubclass(NonFiniteLossError, FloatingPointError)


# The layers (ARCHITECTURE.md): models <- losses <- trainers <- pipelines <- CLI / examples.
LOWER_LAYERS = ["models", "adaptation", "metrics", "shapes", "losses.py", "prompt_learning.py", "configs.py",
                "ddim.py", "mapper.py", "clip_text.py", "clip_image.py", "images.py", "grids.py", "checkpointing.py",
                "outputs.py", "errors.py", "projection.py", "templates.py", "clip_loading.py"]


UPPER_LAYERS = ("ipl_diffusion.pipelines", "ipl_diffusion.cli", "pipelines")


def test_no_module_below_the_pipelines_imports_them_or_the_cli():
    package = REPO / "ipl_diffusion"
    found = []
    for entry in LOWER_LAYERS:
        for path in sorted((package / entry).rglob("*.py")) if (package / entry).is_dir() else [package / entry]:
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                    [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                found += [f"{path.relative_to(REPO)}: {n}" for n in names
                          if any(n == top or n.startswith(top + ".") for top in UPPER_LAYERS)]
    assert not found, found


def test_ipl_adapt_reads_the_backend_from_the_model_folder(monkeypatch, tmp_path):
    import ipl_diffusion.cli.adapt as adapt_cli
    from ipl_diffusion.cli import main
    from ipl_diffusion.shapes import default_model_path

    class Stop(Exception):
        pass

    def load(backend, model, device=None, clip_model=None):
        raise Stop(backend)

    monkeypatch.setattr(adapt_cli, "load_pipeline", load)
    with pytest.raises(Stop, match="stylegan2"):
        main(["adapt", "--model", str(default_model_path("stylegan2")), "--target", "sketch",
              "--output_dir", str(tmp_path / "o")])
