"""The automatic step choice (ipl_diffusion.adaptation.step_choice) on tiny random models:
candidates at the right steps, the selection rule, the returned weights, resume, the reports."""

import json

import pytest
import torch
from transformers import CLIPImageProcessor

from ipl_diffusion.adaptation import diffae
from ipl_diffusion.adaptation import step_choice as sc
from ipl_diffusion.adaptation import stylegan2 as gan
from ipl_diffusion.adaptation.diffae_trainer import DiffAEStage2Trainer
from ipl_diffusion.adaptation.distributed import make_accelerator
from ipl_diffusion.clip_image import CLIPImageEncoder, clip_image_features
from ipl_diffusion.configs import DiffAEStage2Config, GANStage2Config
from ipl_diffusion.errors import UserError
from ipl_diffusion.models.stylegan2 import StyleGAN2Generator
from tiny_ipl import SIZE, build_tiny_ipl_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny latency-bound models (conftest.py)
REAL_SCORE = sc.score_candidate


# ------------------------------------------------------------------ scores and rule


def independent_choice(candidates, min_preservation, min_diversity, tolerance):
    """The documented rule, written another way: walk the eligible candidates in step order
    and return the first whose direction is within ``tolerance`` of the best; with none
    eligible, sort all by (-preservation_ratio, step)."""
    ok = sorted((c for c in candidates if c["preservation_ratio"] >= min_preservation
                 and c["diversity_ratio"] >= min_diversity), key=lambda c: c["step"])
    if ok:
        best = sorted(c["direction"] for c in ok)[-1]
        for c in ok:
            if c["direction"] >= best - tolerance * abs(best):
                return c["step"]
    return sorted(candidates, key=lambda c: (-c["preservation_ratio"], c["step"]))[0]["step"]


def test_selection_rule_matches_an_independent_computation():
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 8, (), generator=gen))
        values = torch.rand(n, 3, generator=gen).round(decimals=1)  # ties happen
        candidates = [{"step": 10 * (i + 1), "direction": float(v[0]) * 2 - 0.5, "preservation_ratio": float(v[1]) * 1.2,
                       "diversity_ratio": float(v[2]) * 1.2} for i, v in enumerate(values)]
        order = torch.randperm(n, generator=gen).tolist()  # the list's order must not matter
        shuffled = [candidates[i] for i in order]
        for tolerance in (0.0, 0.05, 0.3):
            expected = independent_choice(candidates, 0.5, 0.4, tolerance)
            assert sc.choose_step(shuffled, 0.5, 0.4, tolerance) == expected, candidates
            # the weights kept while the run goes on include every step that can still win
            assert expected in sc.possible_steps(shuffled, 0.5, 0.4, tolerance)


def test_possible_steps_hold_the_final_choice_whatever_comes_later():
    # Step 1 is the pick after step 2 (0.80 >= 0.85 - 0.085); step 3 raises the bar past it and
    # step 2, not the pick before, becomes the pick: its weights must still be there.
    c = [{"step": s, "direction": d, "preservation_ratio": 1.0, "diversity_ratio": 1.0}
         for s, d in ((1, 0.80), (2, 0.85), (3, 0.93))]
    assert sc.choose_step(c[:2], 0.5, 0.5, 0.1) == 1 and sc.choose_step(c, 0.5, 0.5, 0.1) == 2
    assert sc.possible_steps(c[:2], 0.5, 0.5, 0.1) == {1, 2}
    gen = torch.Generator().manual_seed(1)
    for trial in range(200):
        values = torch.rand(6, 3, generator=gen).round(decimals=1)
        candidates = [{"step": i + 1, "direction": float(v[0]), "preservation_ratio": float(v[1]),
                       "diversity_ratio": float(v[2])} for i, v in enumerate(values)]
        final = sc.choose_step(candidates, 0.5, 0.3, 0.1)
        kept = set()
        for k in range(1, 7):  # online: what add() keeps in memory after each candidate
            kept = (kept | {k}) & sc.possible_steps(candidates[:k], 0.5, 0.3, 0.1)
        assert final in kept, candidates


def test_selection_rule_examples():
    c = [{"step": 10, "direction": 0.50, "preservation_ratio": 0.95, "diversity_ratio": 1.0},
         {"step": 20, "direction": 0.78, "preservation_ratio": 0.85, "diversity_ratio": 0.9},
         {"step": 30, "direction": 0.80, "preservation_ratio": 0.80, "diversity_ratio": 0.9},
         {"step": 40, "direction": 0.90, "preservation_ratio": 0.40, "diversity_ratio": 0.9}]  # content lost
    assert sc.choose_step(c, 0.5, 0.5, 0.05) == 20  # on the plateau first (0.78 >= 0.95 * 0.80)
    assert sc.choose_step(c, 0.5, 0.5, 0.0) == 30  # no tolerance: the best direction
    assert sc.choose_step(c, 0.3, 0.5, 0.05) == 40  # content guard off: still improving at the end
    assert sc.choose_step(c, 0.99, 0.5, 0.05) == 10  # nothing qualifies: the best preservation
    with pytest.raises(ValueError):
        sc.choose_step([], 0.5, 0.5, 0.05)


def test_scores_of_unchanged_collapsed_and_moved_images():
    gen = torch.Generator().manual_seed(1)
    source = torch.randn(6, 8, generator=gen)
    src_text, tgt_text = torch.zeros(8), torch.eye(8)[0]
    same = sc.score_candidate(source, source, src_text, tgt_text)
    assert same["preservation_ratio"] == pytest.approx(1) and same["diversity_ratio"] == pytest.approx(1)
    assert same["direction"] == pytest.approx(0)
    collapsed = sc.score_candidate(source, torch.ones(6, 8), src_text, tgt_text)
    assert collapsed["diversity"] == pytest.approx(0, abs=1e-9) and collapsed["preservation"] == pytest.approx(0, abs=1e-9)
    moved = sc.score_candidate(source, source + 100 * tgt_text, src_text, tgt_text)
    away = sc.score_candidate(source, source - 100 * tgt_text, src_text, tgt_text)
    assert moved["direction"] > 0.5 and away["direction"] < -0.5


# ------------------------------------------------------------------ the DiffAE trainer


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_ipl_pipeline()


@pytest.fixture(scope="module")
def caches(pipe):
    torch.manual_seed(1)
    images = torch.rand(7, 3, SIZE, SIZE) * 2 - 1
    encode = lambda x: diffae.encode_sources(pipe.semantic_encoder, pipe.source_unet, pipe.scheduler, x, 200, 4,  # noqa: E731
                                             progress=False)
    return encode(images[:4]), encode(images[4:])  # training sources, held-out sources


def diffae_trainer(pipe, caches, output_dir=None, **overrides):
    options = dict(t0=200, num_train_steps=2, num_inference_steps=3, iterations=5, batch_size=2, learning_rate=2e-3,
                   candidate_steps=2)
    options.update(overrides)
    features = clip_image_features(pipe.text_encoder, pipe.feature_extractor)
    d = pipe.text_encoder.config.projection_dim
    gen = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(4, d, generator=gen), torch.randn(4, d, generator=gen)
    trainer = DiffAEStage2Trainer(pipe.source_unet, pipe.scheduler, caches[0], src, tgt, features,
                                  DiffAEStage2Config(**options), accelerator=make_accelerator("no", "cpu"),
                                  output_dir=output_dir)
    if options["candidate_steps"]:
        trainer.enable_step_choice(features, src[0], tgt[0], heldout=caches[1])
    return trainer


def weights_after_each_step(trainer, monkeypatch):
    """step -> a copy of the trained model's weights right after that step."""
    seen = {}
    real_step = trainer.train_step

    def recording(*args):
        record = real_step(*args)
        seen[trainer.step] = {k: v.clone() for k, v in trainer.trained_model().state_dict().items()}
        return record

    monkeypatch.setattr(trainer, "train_step", recording)
    return seen


def assert_same_weights(model, state):
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_candidates_are_kept_at_every_n_steps_and_the_last(pipe, caches, tmp_path):
    trainer = diffae_trainer(pipe, caches, tmp_path, keep_candidates=True)
    trainer.train(progress=False)
    assert [c["step"] for c in trainer.step_choice.candidates] == [2, 4, 5]
    assert sorted(p.name for p in (tmp_path / "candidates").iterdir()) == ["step-000002", "step-000004", "step-000005"]
    assert all((tmp_path / "candidates" / name / "diffusion_pytorch_model.safetensors").is_file()
               for name in ("step-000002", "step-000004", "step-000005"))
    report = json.loads((tmp_path / "step_choice.json").read_text())
    assert report["chosen_step"] in (2, 4, 5) and report["last_step"] == 5
    assert trainer.run_config["step_choice"]["chosen_step"] == report["chosen_step"]
    csv_rows = (tmp_path / "step_choice.csv").read_text().splitlines()
    assert csv_rows[0].startswith("step,direction,preservation") and len(csv_rows) == 4
    from PIL import Image

    assert Image.open(tmp_path / "step_choice.png").size == (480, 300)


def test_without_keep_candidates_no_candidate_folder_stays(pipe, caches, tmp_path):
    trainer = diffae_trainer(pipe, caches, tmp_path)
    trainer.train(progress=False)
    assert not (tmp_path / "candidates").exists() and (tmp_path / "step_choice.json").is_file()


def test_off_by_default_and_refused_without_held_out_sources(pipe, caches):
    assert DiffAEStage2Config().candidate_steps is None and GANStage2Config().candidate_steps is None
    plain = diffae_trainer(pipe, caches, candidate_steps=None, iterations=1)
    plain.train(progress=False)
    assert plain.step_choice is None and "step_choice" not in plain.run_config
    needs = diffae_trainer(pipe, caches, candidate_steps=None, iterations=1)
    needs.config.candidate_steps = 1
    with pytest.raises(UserError, match="enable_step_choice"):
        needs.train(progress=False)
    with pytest.raises(UserError, match="held-out"):
        needs.enable_step_choice(None, torch.zeros(4), torch.ones(4), heldout=None)


def scripted_directions(monkeypatch, directions):
    """Candidates score ``directions`` in the order they are scored (content kept: ratios 1),
    the measured direction kept as ``measured``, so a test decides which step the rule picks."""
    it = iter(directions)

    def scripted(*args):
        measured = REAL_SCORE(*args)
        return {**measured, "measured": measured["direction"], "direction": next(it),
                "preservation_ratio": 1.0, "diversity_ratio": 1.0}

    monkeypatch.setattr(sc, "score_candidate", scripted)


@pytest.mark.parametrize("output", [False, True])
def test_returned_model_holds_the_chosen_candidates_weights(pipe, caches, tmp_path, monkeypatch, output):
    scripted_directions(monkeypatch, [1.0, 0.5, 0.2])  # steps 2, 4, 5: the rule picks step 2
    trainer = diffae_trainer(pipe, caches, tmp_path if output else None)
    seen = weights_after_each_step(trainer, monkeypatch)
    unet = trainer.train(progress=False)
    assert trainer.run_config["step_choice"]["chosen_step"] == 2
    assert_same_weights(unet, seen[2])
    assert any(not torch.equal(v, seen[5][k]) for k, v in unet.state_dict().items())  # not the last step's
    if not output:
        assert set(trainer.step_choice._kept) == {2}  # in memory: only what can still be chosen


def test_resume_continues_the_candidate_list(pipe, caches, tmp_path, monkeypatch):
    # The pick is the candidate of step 2, scored before the kill: it comes back from disk.
    scripted_directions(monkeypatch, [1.0, 0.5, 0.2])
    straight = diffae_trainer(pipe, caches, tmp_path / "a", checkpointing_steps=3)
    seen = weights_after_each_step(straight, monkeypatch)
    straight.train(progress=False)

    scripted_directions(monkeypatch, [1.0, 0.5])
    killed = diffae_trainer(pipe, caches, tmp_path / "b", checkpointing_steps=3)
    real_step = killed.train_step

    def dies_at_iteration_5(*args):
        if killed.step == 4:  # candidate 4 was scored, the newest checkpoint is step 3
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(killed, "train_step", dies_at_iteration_5)
    with pytest.raises(KeyboardInterrupt):
        killed.train(progress=False)
    scripted_directions(monkeypatch, [0.5, 0.2])  # the resumed run scores steps 4 and 5
    resumed = diffae_trainer(pipe, caches, tmp_path / "b", checkpointing_steps=3)
    unet = resumed.train(resume_from_checkpoint="latest", progress=False)
    assert [c["step"] for c in resumed.step_choice.candidates] == [2, 4, 5]
    assert resumed.step_choice.candidates == straight.step_choice.candidates  # measured scores included
    assert resumed.run_config["step_choice"]["chosen_step"] == 2
    assert_same_weights(unet, seen[2])


# ------------------------------------------------------------------ the GAN trainer


def test_gan_candidates_and_the_returned_g_ema(tiny_clip, tmp_path, monkeypatch):
    model, tokenizer = tiny_clip
    image_features = CLIPImageEncoder(model, CLIPImageProcessor()).encode_images
    from ipl_diffusion.clip_text import CLIPPromptEncoder

    with torch.no_grad():
        src, tgt = CLIPPromptEncoder(model, tokenizer).encode_text(["photo", "sketch"])
    torch.manual_seed(0)
    generator = StyleGAN2Generator(size=32, style_dim=16, n_mlp=2, channel_max=8).eval()
    config = GANStage2Config(iterations=3, batch_size=2, auto_layer_iters=0, learning_rate=0.05, candidate_steps=2,
                             num_candidate_images=3, keep_candidates=True)
    trainer = gan.GANIPLTrainer(generator, lambda w: (src.expand(w.shape[0], -1), tgt.expand(w.shape[0], -1)),
                                image_features, tgt, config, output_dir=tmp_path)
    trainer.enable_step_choice(image_features, src, tgt)
    scripted_directions(monkeypatch, [1.0, 0.5])  # steps 2, 3: the rule picks step 2
    seen = weights_after_each_step(trainer, monkeypatch)
    g_ema = trainer.train(progress=False)
    assert [c["step"] for c in trainer.step_choice.candidates] == [2, 3]
    assert_same_weights(g_ema, seen[2])
    saved = StyleGAN2Generator.from_pretrained(str(tmp_path / "candidates" / "step-000003"))
    assert_same_weights(saved, seen[3])


# ------------------------------------------------------------------ through pipe.adapt


def test_adapt_records_the_choice_and_needs_held_out_photos(pipe, tmp_path, monkeypatch):
    from tiny_ipl import FAST

    images = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    with monkeypatch.context() as patch:  # refused before the sources are encoded or Stage 1 runs
        patch.setattr(diffae, "_encoded_sources", lambda *a, **k: pytest.fail("encoded before the refusal"))
        with pytest.raises(UserError, match="validation_images"):
            pipe.adapt("sketch", images=images, candidate_steps=1, num_images=4, **FAST)
    adapted = pipe.adapt("sketch", images=images, validation_images=torch.rand(3, 3, SIZE, SIZE) * 2 - 1,
                         candidate_steps=1, num_images=4, output_dir=str(tmp_path), **FAST)
    choice = adapted.adaptation_config["step_choice"]
    assert [c["step"] for c in choice["candidates"]] == [1, 2] and choice["chosen_step"] in (1, 2)
    assert json.loads((tmp_path / "run_config.json").read_text())["step_choice"] == choice


def test_ipl_adapt_prints_the_choice(tmp_path, capsys):
    from ipl_diffusion.cli.adapt import _report_step_choice

    _report_step_choice({}, tmp_path)
    assert capsys.readouterr().out == ""
    choice = {"chosen_step": 15, "last_step": 30, "candidates": [
        {"step": 15, "direction": 0.784, "preservation_ratio": 0.689, "diversity_ratio": 0.988},
        {"step": 30, "direction": 0.807, "preservation_ratio": 0.695, "diversity_ratio": 0.880}]}
    _report_step_choice({"step_choice": choice}, tmp_path)
    out = capsys.readouterr().out
    assert "step choice: step 15 of 30 (CLIP direction 0.78, preservation 0.69 and diversity 0.99" in out
