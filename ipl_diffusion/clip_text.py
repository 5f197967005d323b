"""CLIP text encoder ``E_T`` fed with learned prompt vectors (Eq. 1-2).

A prompt matrix ``M = [V]_1 .. [V]_m [Y]`` (Eq. 1) enters CLIP as the token-embedding sequence

    [SOS] V_1 .. V_m <label BPE tokens> [EOS]

(CoOp's "class token at the end" layout, which the released IPL code uses, no trailing period).
``V_1..V_m`` replace the token embeddings at positions ``1..m``; the positional embeddings are
added on top as for ordinary tokens. The sequence then goes through CLIP's causal encoder, the
final layer norm, is pooled at the EOT position and projected with ``text_projection``.

transformers 5 notes: ``CLIPTextModel.forward`` rejects
``inputs_embeds``, so we call its sub-modules ourselves: ``embeddings(inputs_embeds=...)`` →
``create_causal_mask`` → ``encoder(..., is_causal=True)`` (without the causal flag attention is
silently bidirectional) → ``final_layer_norm`` → gather → ``text_projection``. On plain token
ids this is bit-identical to ``CLIPModel.get_text_features``.

EOT pooling uses the **first position equal to the EOT id** (the tokenizer's ``eos_token_id``),
never ``argmax(input_ids)``: a token added after EOT has a larger id and would win the argmax
(OpenAI's original code and legacy HF configs with ``eos_token_id == 2`` do that;
``tests/test_clip_text.py`` adds such a token).
A row with no EOT is a ``ValueError``.

Context lengths are counted in **BPE tokens**, not words: the released code splits
``ctx_init`` on spaces, so "an ukiyo-e painting of" (4 words, more tokens) leaves context
tokens in the suffix (``tests/tiny_clip.py`` builds a tokenizer where the two counts differ).

*Anchor addition* (compat option, off by default): the released IPL code adds an ordinary,
unnormalised, detached text embedding to the prompt features before normalising
(``normalize(E_T(M) + E_T(anchor))``; the code of
https://github.com/Picsart-AI-Research/IPL-Zero-Shot-Generative-Model-Adaptation). In Stage 1
the anchor text is ``"<context phrase> <label>."``; its Stage 2 passes the bare context phrase
``"a photo of a"`` for both domains. ``anchor_template`` reproduces either
(``"{context} {label}."`` / ``"{context}"``). The paper (Eq. 3, 5, 8) has no anchor.
"""

from dataclasses import dataclass

import torch

from ipl_diffusion.errors import UserError
from .clip_image import CLIPImageEncoder
from .clip_loading import DEFAULT_CLIP_ID, check_tokenizer, load_clip_component
from .templates import get_templates

DEFAULT_CONTEXT = "a photo of a"


@dataclass(frozen=True)
class PromptLayout:
    """Token layout of one prompt ``[SOS] ctx_1..ctx_m <label> [EOS]``.

    Attributes:
        input_ids: ``(L,)`` int64 ids; positions in ``context`` hold placeholder or phrase ids.
        context: slice of the ``m`` context positions (``1 .. m``).
        label: slice of the label's BPE tokens.
        eos_position: index of EOT (``L - 1``), where the sequence is pooled.
    """

    input_ids: torch.Tensor
    context: slice
    label: slice
    eos_position: int

    @property
    def n_ctx(self):
        return self.context.stop - self.context.start


def first_eos_positions(input_ids, eos_token_id):
    """Index of the first ``eos_token_id`` in every row of ``input_ids``.

    Args:
        input_ids: ``(B, L)`` integer tensor.
        eos_token_id: the EOT id (``tokenizer.eos_token_id``).

    Returns:
        ``(B,)`` int64 positions.

    Raises:
        ValueError: a row contains no EOT (the listed rows are named).
    """
    is_eos = input_ids == eos_token_id
    missing = (~is_eos.any(dim=-1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"Rows {missing} of input_ids contain no end-of-text token (id {eos_token_id}); CLIP pools the text "
            "feature at the first EOT, so every sequence needs one."
        )
    # argmax over a 0/1 int tensor returns the first maximum: the first EOT.
    return is_eos.int().argmax(dim=-1).long()


class CLIPPromptEncoder:
    """The CLIP text side of IPL (``E_T``) with learned prompt vectors, plus ``E_I`` if an image
    processor is given.

    Args:
        clip_model: a ``transformers.CLIPModel`` (any size; ViT-B/32 in the paper). Frozen and put
            in eval mode unless ``freeze=False``; gradients still flow *through* it to prompt vectors.
        tokenizer: its ``CLIPTokenizer``.
        image_processor: optional ``CLIPImageProcessor`` (or its config dict) to enable
            :meth:`encode_images`.
        context: the context phrase used for the "manual" prompt scheme, to initialise learned
            contexts and for anchor texts (default ``"a photo of a"``).
        anchor_addition: released-code compatibility: add ``E_T(anchor text)`` (raw, detached) to the
            output of :meth:`encode_prompt_vectors`. Off by default (the paper has no anchor).
        anchor_template: format string with ``{context}`` and/or ``{label}`` for the anchor text;
            ``"{context} {label}."`` is the released Stage 1, ``"{context}"`` its Stage 2.
        freeze: freeze CLIP (``requires_grad_(False)``, ``eval()``).

    Device and dtype follow ``clip_model``'s parameters; inputs are moved there.
    """

    def __init__(
        self,
        clip_model,
        tokenizer,
        image_processor=None,
        *,
        context=DEFAULT_CONTEXT,
        anchor_addition=False,
        anchor_template="{context} {label}.",
        freeze=True,
    ):
        self.clip_model = clip_model
        self.tokenizer = tokenizer
        self.text_model = clip_model.text_model
        # transformers 4 nested a CLIPTextTransformer inside; 5 made text_model the transformer itself.
        if not hasattr(self.text_model, "embeddings") and hasattr(self.text_model, "text_model"):
            self.text_model = self.text_model.text_model
        if freeze:
            clip_model.requires_grad_(False).eval()
        self.image_encoder = (
            CLIPImageEncoder(clip_model, image_processor, freeze=freeze) if image_processor is not None else None
        )
        self.anchor_addition = bool(anchor_addition)
        self.anchor_template = anchor_template
        self.context = self.validate_context(context)
        self._label_cache = {}

        eos = tokenizer.eos_token_id
        if eos is None:
            eos = clip_model.config.text_config.eos_token_id
        self.eos_token_id = int(eos)
        bos = tokenizer.bos_token_id
        if bos is None:
            bos = clip_model.config.text_config.bos_token_id
        self.bos_token_id = int(bos)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_id
        vocab = self.text_model.embeddings.token_embedding.num_embeddings
        for name, value in (("eos", self.eos_token_id), ("bos", self.bos_token_id)):
            if not 0 <= value < vocab:
                raise UserError(
                    f"The tokenizer's {name} id {value} is outside the text model's vocabulary ({vocab}); the "
                    "tokenizer and CLIP model do not belong together."
                )

    # ------------------------------------------------------------------ properties
    @property
    def hidden_size(self):
        """k: width of the text transformer = size of one prompt vector (512 for ViT-B/32)."""
        return int(self.text_model.embeddings.token_embedding.embedding_dim)

    @property
    def projection_dim(self):
        """D: size of the joint CLIP embedding (512 for ViT-B/32)."""
        return int(self.clip_model.text_projection.out_features)

    @property
    def max_length(self):
        """Longest token sequence the text model accepts, SOS and EOS included (77 for CLIP)."""
        limit = int(self.text_model.embeddings.position_embedding.num_embeddings)
        tok_limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_limit, int) and 0 < tok_limit < limit:
            limit = tok_limit
        return limit

    @property
    def device(self):
        return self.text_model.embeddings.token_embedding.weight.device

    @property
    def dtype(self):
        return self.text_model.embeddings.token_embedding.weight.dtype

    def to(self, device=None, dtype=None):
        """Move the wrapped CLIP model; returns ``self``. Cached label features are dropped."""
        self.clip_model.to(device=device, dtype=dtype)
        self._label_cache.clear()
        return self

    # ------------------------------------------------------------------ tokens
    def token_ids(self, text):
        """BPE ids of ``text`` without SOS/EOS (``list[int]``). CLIP's tokenizer lowercases."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def count_tokens(self, text):
        """Number of BPE tokens of ``text`` (no SOS/EOS): how many context slots a phrase needs."""
        return len(self.token_ids(text))

    def validate_context(self, context):
        """Check a context phrase; returns it stripped.

        Raises:
            ValueError: not a non-blank string.
        """
        if not isinstance(context, str) or not context.strip():
            raise UserError(f"The context phrase must be a non-empty string like 'a photo of a', got {context!r}.")
        return " ".join(context.split())

    def validate_label(self, label, n_ctx=0):
        """Check a domain label and return it stripped (inner whitespace collapsed).

        Args:
            label: the domain label ``Y`` (e.g. ``"Wall painting"``).
            n_ctx: number of context slots that will precede it (``m``).

        Returns:
            The cleaned label string.

        Raises:
            ValueError: not a string; empty/blank; contains CLIP's special tokens; or
                ``1 + n_ctx + tokens(label) + 1`` exceeds :attr:`max_length` (the message gives the
                token counts).
        """
        if not isinstance(label, str):
            raise UserError(f"The domain label must be a string, got {type(label).__name__}: {label!r}.")
        cleaned = " ".join(label.split())
        if not cleaned:
            raise UserError(f"The domain label is empty or blank ({label!r}); give a text such as 'Wall painting'.")
        ids = self.token_ids(cleaned)
        if not ids:
            raise UserError(f"The domain label {label!r} produces no tokens.")
        special = {self.eos_token_id, self.bos_token_id}
        if special & set(ids):
            raise UserError(f"The domain label {label!r} contains CLIP's start/end-of-text tokens.")
        total = len(ids) + int(n_ctx) + 2
        if int(n_ctx) + 3 > self.max_length:  # not even a one-token label fits
            raise UserError(
                f"n_ctx = {int(n_ctx)} prompt vectors leave no room for a label: the CLIP text model takes at "
                f"most {self.max_length} tokens, SOS and EOS included; use n_ctx <= {self.max_length - 3}."
            )
        if total > self.max_length:
            shown = cleaned if len(cleaned) <= 60 else f"{cleaned[:40]}... ({len(cleaned)} characters)"
            raise UserError(
                f"The domain label {shown!r} is too long: {len(ids)} label tokens + {int(n_ctx)} context slots + "
                f"SOS/EOS = {total} tokens, but the CLIP text model takes at most {self.max_length}. Use a "
                f"shorter label (at most {self.max_length - 2 - int(n_ctx)} tokens here)."
            )
        return cleaned

    def prompt_layout(self, label, context):
        """Token layout ``[SOS] ctx <label> [EOS]``.

        Args:
            label: domain label (validated).
            context: an int ``m`` (that many placeholder slots, to be overwritten by prompt
                vectors) or a phrase (its own BPE ids fill the context; ``m`` = its token count).

        Returns:
            :class:`PromptLayout`.
        """
        if isinstance(context, str):
            ctx_ids = self.token_ids(self.validate_context(context))
        else:
            n_ctx = int(context)
            if n_ctx < 0:
                raise UserError(f"n_ctx must be >= 0, got {context}.")
            # Placeholders are overwritten before the encoder sees them; SOS is a safe id (never EOT).
            ctx_ids = [self.bos_token_id] * n_ctx
        label = self.validate_label(label, n_ctx=len(ctx_ids))
        label_ids = self.token_ids(label)
        ids = [self.bos_token_id, *ctx_ids, *label_ids, self.eos_token_id]
        m = len(ctx_ids)
        return PromptLayout(
            input_ids=torch.tensor(ids, dtype=torch.long),
            context=slice(1, 1 + m),
            label=slice(1 + m, 1 + m + len(label_ids)),
            eos_position=len(ids) - 1,
        )

    def context_embeddings(self, context=None):
        """Token embeddings of a context phrase: ``(m, k)`` with ``m`` = its BPE token count.

        These are the fixed prompt vectors of NADA's manual prompt ("a photo of a") and CoOp's
        initialisation of a learned context. Detached copy, on CLIP's device.
        """
        ids = torch.tensor(self.token_ids(self.validate_context(context or self.context)), device=self.device)
        return self.text_model.embeddings.token_embedding(ids).detach().clone()

    # ------------------------------------------------------------------ encoding
    def _encode_token_embeddings(self, token_embeddings, eos_positions):
        """Run CLIP's text tower on token embeddings ``(B, L, k)``; pool at ``eos_positions`` ``(B,)``."""
        from transformers.masking_utils import create_causal_mask

        tm = self.text_model
        hidden = tm.embeddings(inputs_embeds=token_embeddings)  # adds positional embeddings
        mask = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        hidden = tm.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        hidden = tm.final_layer_norm(hidden)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eos_positions.to(hidden.device)]
        return self.clip_model.text_projection(pooled)

    def encode_input_ids(self, input_ids):
        """Raw text features of token ids ``(N, L)`` (must contain EOT; pooled at the first one).

        Returns:
            ``(N, D)`` features; equal to ``CLIPModel.get_text_features(input_ids).pooler_output``
            whenever the config's EOS id is the tokenizer's.
        """
        input_ids = input_ids.to(self.device)
        eos = first_eos_positions(input_ids, self.eos_token_id)
        embeds = self.text_model.embeddings.token_embedding(input_ids)
        return self._encode_token_embeddings(embeds, eos)

    def encode_text(self, texts):
        """Raw CLIP text features of plain strings.

        Args:
            texts: a string or a list of ``N`` strings.

        Returns:
            ``(N, D)`` float features (un-normalised), differentiable w.r.t. nothing trainable
            unless CLIP is unfrozen.

        Raises:
            ValueError: empty list, or a text longer than :attr:`max_length` tokens (count in message).
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("encode_text got an empty list of texts.")
        rows = []
        for text in texts:
            ids = [self.bos_token_id, *self.token_ids(text), self.eos_token_id]
            if len(ids) > self.max_length:
                raise ValueError(
                    f"Text {text!r} has {len(ids)} tokens with SOS/EOS; the CLIP text model takes at most "
                    f"{self.max_length}."
                )
            rows.append(ids)
        # Right-pad; the encoder is causal and pools at the first EOT, so padding never leaks in.
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
        return self.encode_input_ids(input_ids)

    def label_features(self, label, templates="imagenet"):
        """Template-averaged text feature of a domain label, ``E_T(Y)`` in Eq. 5 / NADA's directions.

        ``mean_t Norm(E_T(template_t.format(label)))`` over the templates, as CLIP zero-shot and the
        reference code do (the mean of unit vectors is not re-normalised; losses normalise).

        Args:
            label: domain label.
            templates: ``"imagenet"`` (CLIP's 80), ``"nada"`` (the reference code's 79),
                ``"single"`` (``"a photo of a {}."``) or a sequence of ``"{}"`` format strings.

        Returns:
            ``(D,)`` detached float tensor on CLIP's device (cached per label/templates/device).
        """
        label = self.validate_label(label)
        templates = get_templates(templates)
        key = (label, templates, str(self.device), str(self.dtype))
        if key not in self._label_cache:
            with torch.no_grad():
                feats = self.encode_text([t.format(label) for t in templates])
                feats = feats / feats.norm(dim=-1, keepdim=True)
                self._label_cache[key] = feats.mean(dim=0)
        return self._label_cache[key]

    def anchor_features(self, label, anchor_template=None):
        """Raw ``E_T(anchor_template.format(context=..., label=...))`` ``(D,)``, detached (compat option).

        ``anchor_template`` defaults to the instance's (``"{context} {label}."``: released Stage 1;
        ``"{context}"``: released Stage 2)."""
        label = self.validate_label(label)
        text = (anchor_template or self.anchor_template).format(context=self.context, label=label)
        key = ("__anchor__", text, str(self.device), str(self.dtype))
        if key not in self._label_cache:
            with torch.no_grad():
                self._label_cache[key] = self.encode_text([text])[0]
        return self._label_cache[key]

    def encode_prompt_vectors(self, prompt_vectors, label, anchor_addition=None, anchor_template=None):
        """Text features of prompt matrices ``M^i = [V]^i_1..[V]^i_m [Y]`` (Eq. 1-2).

        Args:
            prompt_vectors: ``(B, m, k)`` float, per-image prompt vectors (mapper output), or
                ``(m, k)`` for one shared set (returns ``B = 1``). ``k`` = :attr:`hidden_size`.
            label: domain label ``Y`` (source or target).
            anchor_addition: override the instance's compat setting for this call.
            anchor_template: override the instance's anchor text template for this call.

        Returns:
            ``(B, D)`` raw features; gradients flow to ``prompt_vectors``. With anchor addition,
            ``E_T(M^i) + E_T(anchor)`` (unnormalised sum, as the released code).

        Raises:
            ValueError: wrong shape / width, non-float input, or a label that is empty or too long
                for ``m`` context slots.
        """
        if not torch.is_tensor(prompt_vectors) or not prompt_vectors.is_floating_point():
            raise ValueError("prompt_vectors must be a float tensor of shape (B, m, k).")
        if prompt_vectors.ndim == 2:
            prompt_vectors = prompt_vectors.unsqueeze(0)
        if prompt_vectors.ndim != 3 or prompt_vectors.shape[-1] != self.hidden_size:
            raise ValueError(
                f"prompt_vectors must have shape (B, m, k={self.hidden_size}) (k = the CLIP text width), got "
                f"{tuple(prompt_vectors.shape)}."
            )
        batch, m, _ = prompt_vectors.shape
        layout = self.prompt_layout(label, m)
        ids = layout.input_ids.to(self.device)
        with torch.no_grad():
            fixed = self.text_model.embeddings.token_embedding(ids)  # (L, k): SOS, placeholders, label, EOS
        prefix = fixed[: layout.context.start].expand(batch, -1, -1)
        suffix = fixed[layout.context.stop :].expand(batch, -1, -1)
        vectors = prompt_vectors.to(device=self.device, dtype=fixed.dtype)
        embeds = torch.cat([prefix, vectors, suffix], dim=1)
        eos = torch.full((batch,), layout.eos_position, dtype=torch.long, device=self.device)
        features = self._encode_token_embeddings(embeds, eos)
        use_anchor = self.anchor_addition if anchor_addition is None else anchor_addition
        if use_anchor:
            features = features + self.anchor_features(label, anchor_template)
        return features

    def encode_images(self, images):
        """Raw CLIP image features ``(B, D)`` of ``(B, 3, H, W)`` images in ``[-1, 1]`` (differentiable).

        Raises:
            ValueError: the encoder was built without an image processor.
        """
        if self.image_encoder is None:
            raise ValueError(
                "This CLIPPromptEncoder has no image processor; pass image_processor=CLIPImageProcessor(...) "
                "(or its config dict) or use CLIPPromptEncoder.from_pretrained."
            )
        return self.image_encoder.encode_images(images)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_id=DEFAULT_CLIP_ID, device=None, dtype=None, **kwargs):
        """Load ``CLIPModel`` + ``CLIPTokenizer`` + ``CLIPImageProcessor`` and wrap them.

        Args:
            path_or_id: Hub id (default ``"openai/clip-vit-base-patch32"``, the paper's ViT-B/32)
                or a local folder holding all three (``save_pretrained`` of each).
            device, dtype: where to put CLIP (default: CPU, float32).
            **kwargs: passed to the constructor (``context``, ``anchor_addition``...).

        Raises:
            FileNotFoundError: a component is missing; offline (``HF_HUB_OFFLINE=1``) this is
                immediate, with no network wait. The message names the component and how to pass
                a local folder.
        """
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

        model = load_clip_component(CLIPModel, path_or_id, "CLIP model")
        tokenizer = load_clip_component(CLIPTokenizer, path_or_id, "CLIP tokenizer")
        check_tokenizer(tokenizer, path_or_id, vocab_size=model.config.text_config.vocab_size)
        processor = load_clip_component(CLIPImageProcessorPil, path_or_id, "CLIP image processor")
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return cls(model, tokenizer, processor, **kwargs)


__all__ = ["CLIPPromptEncoder", "PromptLayout", "first_eos_positions", "DEFAULT_CONTEXT"]
