"""CLIP text/image encoding with learned prompt vectors (Eq. 1-2): context counted in BPE tokens,
EOT pooling, learned vectors entering CLIP, offline loading errors, devices."""

import os
import socket
from pathlib import Path

import pytest
import torch
from ipl_core_testing import build_encoder, build_image_processor
from tiny_clip import build_clip, build_tokenizer

from ipl_diffusion.clip_image import CLIPImageEncoder, image_processor_settings, preprocess_images
from ipl_diffusion.clip_text import CLIPPromptEncoder, first_eos_positions
from ipl_diffusion.templates import IMAGENET_TEMPLATES, NADA_TEMPLATES, SINGLE_TEMPLATE, get_templates


@pytest.fixture(scope="module")
def encoder():
    return build_encoder()


def stock_text_features(encoder, texts):
    ids = encoder.tokenizer(texts, padding=True, return_tensors="pt").input_ids
    return encoder.clip_model.get_text_features(input_ids=ids).pooler_output


# ---------------------------------------------------------------- basics
def test_sizes(encoder):
    assert encoder.hidden_size == 32  # k: text width of the tiny model
    assert encoder.projection_dim == 32  # D
    assert encoder.max_length == 64


def test_encode_text_matches_stock_clip(encoder):
    texts = ["a photo of a dog", "a cat", "wall painting"]
    with torch.no_grad():
        ours = encoder.encode_text(texts)
        stock = stock_text_features(encoder, texts)
    assert ours.shape == (3, 32)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-6)


def test_clip_is_frozen_and_in_eval(encoder):
    assert all(not p.requires_grad for p in encoder.clip_model.parameters())
    assert not encoder.clip_model.training


# ---------------------------------------------------------------- context counted in BPE tokens
def test_context_slots_are_bpe_tokens(encoder):
    phrase = "an ukiyo-e painting of"
    tokens = encoder.tokenizer.tokenize(phrase)
    assert len(phrase.split()) == 4 and len(tokens) > 4  # words != tokens (the reference used words)
    assert encoder.count_tokens(phrase) == len(tokens)
    layout = encoder.prompt_layout("dog", phrase)
    phrase_ids = encoder.token_ids(phrase)
    label_ids = encoder.token_ids("dog")
    assert layout.n_ctx == len(tokens)
    assert layout.context == slice(1, 1 + len(tokens))
    assert layout.input_ids[0] == encoder.bos_token_id
    assert layout.input_ids[layout.context].tolist() == phrase_ids  # prefix span: all phrase tokens, none leaked
    assert layout.input_ids[layout.label].tolist() == label_ids  # suffix span: exactly the label
    assert layout.eos_position == len(layout.input_ids) - 1
    assert layout.input_ids[layout.eos_position] == encoder.eos_token_id
    assert encoder.context_embeddings(phrase).shape == (len(tokens), encoder.hidden_size)


def test_prompt_from_phrase_equals_plain_text(encoder):
    phrase = "an ukiyo-e painting of"
    vectors = encoder.context_embeddings(phrase)
    with torch.no_grad():
        from_vectors = encoder.encode_prompt_vectors(vectors[None], "dog")
        plain = encoder.encode_text([f"{phrase} dog"])
    torch.testing.assert_close(from_vectors, plain, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- EOT pooling
def test_pools_at_first_eot_not_argmax():
    enc = build_encoder(extra_tokens=["<ukiyoe>"])
    extra = enc.tokenizer.convert_tokens_to_ids("<ukiyoe>")
    assert extra > enc.eos_token_id  # the added token's id beats EOT in an argmax
    text = "a <ukiyoe> dog"
    ids = enc.tokenizer([text], return_tensors="pt").input_ids
    assert extra in ids[0].tolist() and ids[0].tolist().index(extra) < ids[0].tolist().index(enc.eos_token_id)
    with torch.no_grad():
        ours = enc.encode_text([text])
        stock = enc.clip_model.get_text_features(input_ids=ids).pooler_output  # config eos != 2: first EOS
        # What argmax pooling would give: the hidden state at the added token.
        hidden = enc.clip_model.text_model(input_ids=ids).last_hidden_state  # final layer norm applied
        argmax_pooled = enc.clip_model.text_projection(hidden[0, ids[0].argmax()])
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-6)
    assert not torch.allclose(ours[0], argmax_pooled, atol=1e-3)
    # The same holds on the prompt-vector path, with the added token inside the label.
    vectors = enc.context_embeddings("a photo of a")[None]
    with torch.no_grad():
        from_vectors = enc.encode_prompt_vectors(vectors, "<ukiyoe> dog")
        plain = enc.encode_text(["a photo of a <ukiyoe> dog"])
    torch.testing.assert_close(from_vectors, plain, rtol=0, atol=1e-6)


def test_row_without_eot_is_an_error(encoder):
    ids = torch.tensor([[encoder.bos_token_id, 5, 6, encoder.eos_token_id], [encoder.bos_token_id, 5, 6, 7]])
    with pytest.raises(ValueError, match=r"Rows \[1\].*end-of-text"):
        first_eos_positions(ids, encoder.eos_token_id)
    with pytest.raises(ValueError, match="end-of-text"):
        encoder.encode_input_ids(ids)
    eot = encoder.eos_token_id
    assert first_eos_positions(torch.tensor([[1, eot, eot, 3], [eot, 2, 2, eot]]), eot).tolist() == [1, 0]


# ---------------------------------------------------------------- learned vectors enter CLIP
def test_no_override_equals_stock_get_text_features(encoder):
    vectors = encoder.context_embeddings("a photo of a").expand(2, -1, -1)
    with torch.no_grad():
        ours = encoder.encode_prompt_vectors(vectors, "dog")
        stock = stock_text_features(encoder, ["a photo of a dog"])
    assert ours.shape == (2, 32)
    torch.testing.assert_close(ours, stock.expand(2, -1), rtol=0, atol=1e-6)


def test_vectors_change_output_and_receive_gradients(encoder):
    base = encoder.context_embeddings("a photo of a")
    vectors = torch.stack([base, base + 0.5 * torch.randn(base.shape, generator=torch.Generator().manual_seed(0))])
    vectors.requires_grad_(True)
    features = encoder.encode_prompt_vectors(vectors, "wall painting")
    assert not torch.allclose(features[0], features[1], atol=1e-4)  # per-image prompts give per-image features
    features.pow(2).sum().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum(dim=-1).gt(0).all()  # every slot of every row
    assert all(p.grad is None for p in encoder.clip_model.parameters())  # CLIP itself gets nothing


def test_positional_embeddings_are_added_to_learned_vectors(encoder):
    captured = {}
    handle = encoder.text_model.embeddings.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    try:
        vectors = torch.randn(1, 3, encoder.hidden_size)
        with torch.no_grad():
            encoder.encode_prompt_vectors(vectors, "dog")
    finally:
        handle.remove()
    position = encoder.text_model.embeddings.position_embedding.weight
    torch.testing.assert_close(captured["out"][0, 1:4], vectors[0] + position[1:4], rtol=0, atol=1e-6)


def test_shared_prompt_vectors_as_a_2d_tensor(encoder):
    vectors = encoder.context_embeddings("a photo of a")
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.encode_prompt_vectors(vectors, "dog"), encoder.encode_prompt_vectors(vectors[None], "dog")
        )


def test_encode_prompt_vectors_shape_errors(encoder):
    with pytest.raises(ValueError, match=r"\(B, m, k=32\)"):
        encoder.encode_prompt_vectors(torch.zeros(2, 4, 31), "dog")
    with pytest.raises(ValueError, match="float"):
        encoder.encode_prompt_vectors(torch.zeros(2, 4, 32, dtype=torch.long), "dog")


# ---------------------------------------------------------------- labels
@pytest.mark.parametrize("label", ["", "   ", "\n\t"])
def test_blank_label_is_an_error(encoder, label):
    with pytest.raises(ValueError, match="empty or blank"):
        encoder.validate_label(label)
    with pytest.raises(ValueError, match="empty or blank"):
        encoder.encode_prompt_vectors(torch.zeros(1, 4, 32), label)


def test_non_string_label_is_an_error(encoder):
    with pytest.raises(ValueError, match="must be a string"):
        encoder.validate_label(None)


def test_over_long_label_reports_token_counts(encoder):
    label = "wall painting " * 40
    n_tokens = encoder.count_tokens(label)
    with pytest.raises(ValueError, match=rf"{n_tokens} label tokens \+ 4 context slots \+ SOS/EOS = {n_tokens + 6} tokens"):
        encoder.validate_label(label, n_ctx=4)
    with pytest.raises(ValueError, match="at most 64"):
        encoder.encode_prompt_vectors(torch.zeros(1, 4, 32), label)
    with pytest.raises(ValueError, match="tokens with SOS/EOS"):
        encoder.encode_text([label])


def test_label_that_just_fits(encoder):
    # 64 positions = SOS + 4 context + label + EOS -> 58 label tokens is the maximum.
    label = "a " * 58
    assert encoder.count_tokens(label) == 58
    assert encoder.validate_label(label, n_ctx=4) == "a " * 57 + "a"
    with pytest.raises(ValueError, match="too long"):
        encoder.validate_label(label, n_ctx=5)
    encoder.validate_label("a", n_ctx=61)  # SOS + 61 + one label token + EOS = 64
    with pytest.raises(ValueError, match=r"n_ctx = 62 prompt vectors leave no room for a label.*n_ctx <= 61"):
        encoder.validate_label("a", n_ctx=62)  # said "at most 0 tokens here"


def test_validate_label_normalises_whitespace(encoder):
    assert encoder.validate_label("  Wall   painting ") == "Wall painting"


# ---------------------------------------------------------------- templates
def test_templates_data():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert len(NADA_TEMPLATES) == 79 and set(IMAGENET_TEMPLATES) - set(NADA_TEMPLATES) == {"a photo of many {}."}
    assert SINGLE_TEMPLATE == ("a photo of a {}.",)
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    with pytest.raises(ValueError, match="Unknown template set"):
        get_templates("imagenet80")
    with pytest.raises(ValueError, match="exactly one"):
        get_templates(["no placeholder"])


def test_label_features_are_the_mean_of_normalised_template_features(encoder):
    with torch.no_grad():
        feats = encoder.encode_text([t.format("dog") for t in IMAGENET_TEMPLATES])
        expected = (feats / feats.norm(dim=-1, keepdim=True)).mean(0)
        single = encoder.encode_text(["a photo of a dog."])[0]
    got = encoder.label_features("dog")
    assert got.shape == (32,) and not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(encoder.label_features("dog", templates="single"), single / single.norm(), rtol=0, atol=1e-6)
    assert encoder.label_features("dog", templates="nada").shape == (32,)
    assert not torch.allclose(encoder.label_features("dog"), encoder.label_features("dog", templates="nada"))


# ---------------------------------------------------------------- anchor addition (compat option)
def test_anchor_addition_off_by_default_and_matches_reference_when_on():
    plain = build_encoder()
    assert plain.anchor_addition is False
    anchored = CLIPPromptEncoder(plain.clip_model, plain.tokenizer, anchor_addition=True)
    vectors = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        delta = plain.encode_prompt_vectors(vectors, "disney")
        with_anchor = anchored.encode_prompt_vectors(vectors, "disney")
        anchor = plain.encode_text(["a photo of a disney."])[0]  # released Stage 1: "<ctx> <label>."
    torch.testing.assert_close(with_anchor, delta + anchor, rtol=0, atol=1e-6)
    stage2 = CLIPPromptEncoder(plain.clip_model, plain.tokenizer, anchor_addition=True, anchor_template="{context}")
    with torch.no_grad():
        torch.testing.assert_close(
            stage2.encode_prompt_vectors(vectors, "disney") - delta,
            plain.encode_text(["a photo of a"]).expand(2, -1), rtol=0, atol=1e-5,
        )
    # Per-call overrides.
    with torch.no_grad():
        torch.testing.assert_close(
            anchored.encode_prompt_vectors(vectors, "disney", anchor_template="{context}"),
            stage2.encode_prompt_vectors(vectors, "disney"),
        )
    torch.testing.assert_close(anchored.encode_prompt_vectors(vectors, "disney", anchor_addition=False), delta)


# ---------------------------------------------------------------- image side
def test_image_preprocessing_uses_processor_statistics_and_is_differentiable():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    processor = build_image_processor(mean=mean, std=std)
    assert image_processor_settings(processor)[:2] == (mean, std)
    assert image_processor_settings(processor.to_dict())[:2] == (mean, std)  # config dict accepted
    images = torch.zeros(1, 3, 32, 32)  # 0 in [-1, 1] is 0.5 in [0, 1]
    out = preprocess_images(images, 32, mean, std)
    for c in range(3):
        torch.testing.assert_close(out[0, c], torch.full((32, 32), (0.5 - mean[c]) / std[c]))
    with pytest.raises(ValueError, match="image_mean"):
        image_processor_settings({"image_std": [1, 1, 1]})


def test_image_preprocessing_resizes_and_centre_crops_non_square():
    images = torch.linspace(-1, 1, 40).view(1, 1, 1, 40).expand(2, 3, 64, 40).clone().requires_grad_(True)
    out = preprocess_images(images, 32, (0.5,) * 3, (0.5,) * 3)
    assert out.shape == (2, 3, 32, 32)
    out[:, :, 0, 0].sum().backward()
    assert images.grad.abs().sum() > 0  # gradients reach the generator's output
    # Shortest edge 40 -> 32, long edge 64 -> 51, centre crop rows; columns keep the left-to-right ramp.
    assert out[0, 0, 0, 0] < out[0, 0, 0, -1]
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        preprocess_images(torch.zeros(3, 32, 32), 32, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="float"):
        preprocess_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 32, (0.5,) * 3, (0.5,) * 3)


def test_encode_images_matches_stock_and_flows_gradients(encoder):
    images = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    feats = encoder.encode_images(images)
    assert feats.shape == (2, 32)
    mean, std = image_processor_settings(build_image_processor())[:2]
    pixel_values = ((images + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    stock = encoder.clip_model.get_image_features(pixel_values=pixel_values).pooler_output
    torch.testing.assert_close(feats, stock, rtol=0, atol=1e-5)
    feats.sum().backward()
    assert images.grad.abs().sum() > 0


def test_encode_images_without_processor_is_a_clear_error(encoder):
    enc = CLIPPromptEncoder(encoder.clip_model, encoder.tokenizer)
    with pytest.raises(ValueError, match="image processor"):
        enc.encode_images(torch.zeros(1, 3, 32, 32))


# ---------------------------------------------------------------- loading (offline, no network wait) and devices
def _save_components(folder, model, tokenizer, processor=None):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)


def test_from_pretrained_round_trip_through_a_local_folder(tmp_path, encoder):
    _save_components(tmp_path, encoder.clip_model, encoder.tokenizer, build_image_processor())
    loaded = CLIPPromptEncoder.from_pretrained(tmp_path)
    assert isinstance(loaded.image_encoder, CLIPImageEncoder)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(["a photo of a dog"]), encoder.encode_text(["a photo of a dog"]))
        images = torch.rand(1, 3, 48, 48) * 2 - 1
        torch.testing.assert_close(loaded.encode_images(images), encoder.encode_images(images))
    image_only = CLIPImageEncoder.from_pretrained(tmp_path)
    assert image_only.image_size == 32 and image_only.projection_dim == 32


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to open a connection (offline loading must not wait on a socket)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_offline_missing_id_fails_fast_and_clearly(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as info:
        CLIPPromptEncoder.from_pretrained("nobody/clip-that-is-not-cached")
    message = str(info.value)
    assert "CLIP model" in message and "nobody/clip-that-is-not-cached" in message
    assert "local folder" in message and "HF_HUB_OFFLINE" in message
    assert no_network == []  # no connection was even attempted


def test_offline_detected_even_if_set_after_import(monkeypatch, no_network):
    # huggingface_hub reads HF_HUB_OFFLINE at import; we must read it at call time.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="CLIP image processor|CLIP model"):
        CLIPImageEncoder.from_pretrained("nobody/clip-that-is-not-cached")
    assert no_network == []


def test_local_folder_without_tokenizer_names_the_component(tmp_path, encoder, no_network):
    encoder.clip_model.save_pretrained(tmp_path)  # model only
    with pytest.raises(FileNotFoundError, match="CLIP tokenizer"):
        CLIPPromptEncoder.from_pretrained(tmp_path)


def test_local_folder_problems_name_the_folder_not_the_hub(tmp_path, encoder, no_network):
    """A missing, foreign or corrupt local folder is reported as such, without the advice to
    download a Hub id, and without asking the Hub."""
    from safetensors import SafetensorError

    with pytest.raises(FileNotFoundError, match="the folder '/nowhere/clip' does not exist") as info:
        CLIPPromptEncoder.from_pretrained("/nowhere/clip")
    assert "hf download" not in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="from the local folder .*empty.*no file named") as info:
        CLIPPromptEncoder.from_pretrained(tmp_path / "empty")
    assert "hf download" not in str(info.value)
    encoder.clip_model.save_pretrained(tmp_path / "corrupt")
    weights = tmp_path / "corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(FileNotFoundError, match="from the local folder .*corrupt") as info:
        CLIPPromptEncoder.from_pretrained(tmp_path / "corrupt")
    assert isinstance(info.value.__cause__, (SafetensorError, OSError))
    with pytest.raises(ValueError, match="empty folder name or Hub id"):
        CLIPPromptEncoder.from_pretrained("")
    with pytest.raises(FileNotFoundError, match="is a file; give the folder that holds it"):
        CLIPPromptEncoder.from_pretrained(weights)
    encoder.clip_model.save_pretrained(tmp_path / "no_tokenizer")  # model only: the tokenizer's files are missing
    with pytest.raises(FileNotFoundError, match="CLIP tokenizer") as info:
        CLIPPromptEncoder.from_pretrained(tmp_path / "no_tokenizer")
    assert "hf download" not in str(info.value)
    assert no_network == []


def test_local_folder_without_image_processor_names_the_component(tmp_path, encoder, no_network):
    _save_components(tmp_path, encoder.clip_model, encoder.tokenizer)
    with pytest.raises(FileNotFoundError, match="CLIP image processor"):
        CLIPPromptEncoder.from_pretrained(tmp_path)


def test_mismatched_tokenizer_and_model(tmp_path):
    model, _ = build_clip()
    big = build_tokenizer(extra_tokens=[f"<t{i}>" for i in range(50)])
    _save_components(tmp_path, model, big, build_image_processor())
    with pytest.raises(ValueError, match="do not belong together"):
        CLIPPromptEncoder.from_pretrained(tmp_path)


def test_device_comes_from_the_model(encoder):
    assert encoder.device == torch.device("cpu")
    assert encoder.encode_text(["dog"]).device == encoder.device


def test_no_hard_coded_cuda_in_core_modules():
    root = Path(__file__).resolve().parents[1] / "ipl_diffusion"
    for name in ("clip_text.py", "clip_image.py", "clip_loading.py", "mapper.py", "losses.py", "prompt_learning.py"):
        source = (root / name).read_text()
        assert '"cuda' not in source and "'cuda" not in source and ".cuda(" not in source, name


def test_offline_env_helper(monkeypatch):
    from ipl_diffusion.clip_loading import hub_offline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "1"
