"""Tiny, randomly initialised CLIP models and an offline CLIP BPE tokenizer, built in code.

transformers' own tests download ``hf-internal-testing/tiny-random-clip``; we cannot, so
we build the same kind of model here. The tokenizer uses CLIP's byte-level alphabet
(every byte, alone and with the ``</w>`` end-of-word marker) plus a few merges, so it can
tokenise any text, and its start/end ids are written into the text config as CLIP
requires (a tiny config that keeps the default eos id silently pools position 0).
"""

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

# Merges that turn a few common words into single tokens, so tests can tell
# "words" from "BPE tokens". Order matters: BPE applies them in rank order.
_WORDS = ("photo", "painting", "sketch", "of", "an", "a", "the", "wall", "dog", "cat")


def _merges_for(word):
    """Left-to-right merges that build ``word + '</w>'`` from single characters."""
    merges, current = [], word[0]
    for i, char in enumerate(word[1:], start=1):
        last = i == len(word) - 1
        piece = char + ("</w>" if last else "")
        merges.append((current, piece))
        current = current + piece
    return merges


def build_tokenizer(extra_tokens=()):
    """An offline ``CLIPTokenizer``: byte alphabet + ``</w>`` forms + word merges + SOT/EOT.

    ``extra_tokens`` are added *after* EOT with ``add_tokens``, so their ids exceed the EOT
    id (the case where pooling at argmax(input_ids) would pick the wrong token).
    """
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {}
    for symbol in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges = []
    for word in _WORDS:
        for pair in _merges_for(word):
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens))
    return tokenizer


def build_clip(tokenizer=None, image_size=32, projection_dim=32, seed=0, max_position_embeddings=16):
    """A tiny random ``CLIPModel`` (about 70k parameters) matched to ``tokenizer``."""
    import torch

    tokenizer = tokenizer or build_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    return model, tokenizer
