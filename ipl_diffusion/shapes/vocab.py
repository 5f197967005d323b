"""Captions of the Shapes world and the byte-level BPE ``CLIPTokenizer`` built from them.

Captions come from a few templates that mention any subset of an image's style, colour and
shape ("a sketch of a red circle", "a blue ring", "a neon sign"...), plus CLIP's ImageNet
templates filled with a style name ("a bad photo of a mosaic.") so that the template-averaged
domain-label features that IPL and NADA use (Eq. 5 and the fixed directions) are meaningful to
the Shapes CLIP. Each caption carries the factors it mentions, so a batch's image–text match
matrix is exact: a text matches every image that agrees with everything the text says.

The tokenizer is a real ``transformers.CLIPTokenizer`` (same pre-tokenisation, lower-casing and
``</w>`` end-of-word BPE as OpenAI's): its vocabulary is the 256 byte-level symbols alone and
with ``</w>`` (so *any* text tokenises, nothing falls back to an unknown id), one token per
caption word built by left-to-right merges, then ``<|startoftext|>``, ``<|endoftext|>`` and a
separate ``<|unk|>`` token (the tokenizer's unknown token is never the end-of-text token, which
CLIP pools at).
"""

import random

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer

from ..templates import IMAGENET_TEMPLATES
from .renderer import COLORS, SHAPES, STYLES

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"
# Context length of the Shapes CLIP text tower: the longest caption is ~10 tokens; the rest
# leaves room for IPL's m learned prompt vectors ([SOS] V_1..V_m <label> [EOS], Eq. 1).
MODEL_MAX_LENGTH = 32

# Templates keyed by the factors they mention.
CAPTION_TEMPLATES = {
    ("style", "color", "shape"): (
        "a {style} of a {color} {shape}",
        "a {color} {shape} in {style} style",
        "{style} of a {color} {shape}",
        "a {style} image of a {color} {shape}",
    ),
    ("style", "shape"): ("a {style} of a {shape}", "a {shape} in {style} style"),
    ("style", "color"): ("a {style} of a {color} object", "a {color} {style}"),
    ("color", "shape"): ("a {color} {shape}", "an image of a {color} {shape}"),
    ("style",): ("a {style}", "{style}", "a {style} image", "{style} style"),
    ("color",): ("a {color} object", "something {color}"),
    ("shape",): ("a {shape}", "the shape of a {shape}"),
}

# Zero-shot classification prompts (one text per class) used to measure the Shapes CLIP.
ZERO_SHOT_PROMPTS = {"style": "a {style}", "color": "a {color} object", "shape": "a {shape}"}


def zero_shot_texts(factor):
    """The class prompts for zero-shot classification of ``factor`` ("style", "color" or "shape")."""
    names = dict(style=STYLES, color=COLORS, shape=SHAPES)[factor]
    return [ZERO_SHOT_PROMPTS[factor].format(**{factor: n}) for n in names]


def _vocabulary_words():
    words = set()
    for names in (SHAPES, COLORS, STYLES):
        for name in names:
            words.update(name.split())
    for templates in CAPTION_TEMPLATES.values():
        for t in templates:
            words.update(w for w in t.replace("{", " {").split() if not w.startswith("{"))
    for t in IMAGENET_TEMPLATES:
        words.update(t.replace("{}", " ").replace(".", " ").split())
    return sorted(words)


def _learn_merges(words):
    """BPE merges (rank order) that turn every caption word into one ``word</w>`` token.

    Classic BPE learning (Sennrich et al. 2016) on the word list with CLIP's ``</w>``
    end-of-word marker, run until no pair is left so that a caption word is never split. Ties
    between equally frequent pairs go to the lexicographically smallest pair, which makes the
    vocabulary -- and so every token id -- identical on every build (the ``tokenizers``
    trainer breaks ties by hash order, so its ids differ between runs).
    """
    from collections import Counter

    corpus = [tuple(word[:-1]) + (word[-1] + "</w>",) for word in words if len(word) > 1]
    merges = []
    while True:
        counts = Counter(pair for symbols in corpus for pair in zip(symbols, symbols[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        new_corpus = []
        for symbols in corpus:
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_corpus.append(tuple(out))
        corpus = [c for c in new_corpus if len(c) > 1]


def build_tokenizer(model_max_length=MODEL_MAX_LENGTH):
    """Build the Shapes ``CLIPTokenizer`` in code (no files, no network).

    Returns a ``transformers.CLIPTokenizer`` whose ids are contiguous: byte symbols, byte
    symbols + ``</w>``, one id per merge result, then BOS, EOS and UNK. Padding uses EOS as
    OpenAI's CLIP does (pooling takes the *first* EOS, so padding never moves it).
    """
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {}
    for symbol in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges = _learn_merges(_vocabulary_words())
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN):
        vocab[special] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )


def caption_for(style=None, color=None, shape=None, rng=None, imagenet_template_prob=0.0):
    """One caption mentioning exactly the given (non-``None``) factors, by name.

    With ``imagenet_template_prob`` > 0 and only ``style`` given, a CLIP ImageNet template
    filled with the style name may be used instead ("a rendering of a sketch.").
    """
    rng = rng or random
    given = {k: v for k, v in dict(style=style, color=color, shape=shape).items() if v is not None}
    key = tuple(k for k in ("style", "color", "shape") if k in given)
    if not key:
        raise ValueError("A caption must mention at least one of style, color, shape.")
    if key == ("style",) and rng.random() < imagenet_template_prob:
        return rng.choice(IMAGENET_TEMPLATES).format(given["style"])
    return rng.choice(CAPTION_TEMPLATES[key]).format(**given)


def caption_for_mentioned(said, rng, imagenet_template_prob=0.0):
    """:func:`caption_for` of a ``{factor: index}`` dict (a ``mentioned`` entry of :func:`sample_captions`)."""
    return caption_for(
        style=STYLES[said["style"]] if "style" in said else None,
        color=COLORS[said["color"]] if "color" in said else None,
        shape=SHAPES[said["shape"]] if "shape" in said else None,
        rng=rng,
        imagenet_template_prob=imagenet_template_prob,
    )


def sample_captions(factors, rng, mention_prob=(0.85, 0.7, 0.7), imagenet_template_prob=0.25):
    """One random caption per image of a :class:`~ipl_diffusion.shapes.renderer.ShapeFactors`.

    Each of style / colour / shape is mentioned with probability ``mention_prob`` (at least one
    always is). Returns ``(captions, mentioned)`` where ``mentioned`` is a list of dicts
    ``{factor: index}`` of what each caption states, for building exact match matrices.
    """
    captions, mentioned = [], []
    for i in range(len(factors)):
        keep = [rng.random() < p for p in mention_prob]
        if not any(keep):
            keep[rng.randrange(3)] = True
        said = {}
        if keep[0]:
            said["style"] = int(factors.style[i])
        if keep[1]:
            said["color"] = int(factors.color[i])
        if keep[2]:
            said["shape"] = int(factors.shape[i])
        captions.append(caption_for_mentioned(said, rng, imagenet_template_prob))
        mentioned.append(said)
    return captions, mentioned
