"""The Shapes captions and the byte-level BPE CLIPTokenizer built from them."""

import random

import pytest
from transformers import CLIPTokenizer

from ipl_diffusion.shapes import COLORS, SHAPES, STYLES, sample_factors
from ipl_diffusion.shapes.vocab import (
    BOS_TOKEN,
    EOS_TOKEN,
    UNK_TOKEN,
    build_tokenizer,
    caption_for,
    sample_captions,
    zero_shot_texts,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_special_tokens_are_distinct_and_last(tokenizer):
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)]
    assert len(set(ids)) == 3
    assert tokenizer.eos_token_id == vocab[EOS_TOKEN] and tokenizer.unk_token_id == vocab[UNK_TOKEN]
    assert tokenizer.unk_token_id != tokenizer.eos_token_id
    assert sorted(vocab.values()) == list(range(len(vocab)))  # contiguous ids


def test_every_caption_word_is_one_token_and_round_trips(tokenizer):
    rng = random.Random(0)
    factors = sample_factors(200, seed=0)
    captions, _ = sample_captions(factors, rng, imagenet_template_prob=0.0)
    for caption in captions + [t for f in ("style", "color", "shape") for t in zero_shot_texts(f)]:
        ids = tokenizer(caption).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert ids.count(tokenizer.eos_token_id) == 1
        assert len(ids) == len(caption.split()) + 2, caption
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption


def test_unknown_text_tokenises_without_unknown_or_end_tokens(tokenizer):
    for text in ("Wall painting", "Ukiyo-e!", "zzqx 123 ümlaut"):
        ids = tokenizer(text).input_ids[1:-1]
        assert ids and tokenizer.unk_token_id not in ids and tokenizer.eos_token_id not in ids
        assert tokenizer.decode(ids).replace(" ", "") == text.lower().replace(" ", "")


def test_build_is_deterministic_and_saves(tokenizer, tmp_path):
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a pixel art of a purple triangle"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.unk_token == UNK_TOKEN and loaded.model_max_length == tokenizer.model_max_length


def test_captions_mention_exactly_what_they_record():
    rng = random.Random(1)
    factors = sample_factors(100, seed=1)
    captions, mentioned = sample_captions(factors, rng, imagenet_template_prob=0.5)
    for i, (caption, said) in enumerate(zip(captions, mentioned)):
        assert said
        for key, names in (("style", STYLES), ("color", COLORS), ("shape", SHAPES)):
            if key in said:
                assert said[key] == int(getattr(factors, key)[i])
                assert names[said[key]] in caption
            else:
                assert not any(f" {n}" in f" {caption}" for n in names if n != "photo"), caption
    with pytest.raises(ValueError, match="at least one"):
        caption_for()
