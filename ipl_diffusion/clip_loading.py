"""Loading CLIP components (model, tokenizer, image processor) from the Hub or a local folder.

One concern only: turn the many ways a download can fail into one clear error that names the
component and tells the user how to supply a local copy. Two pitfalls of
the pinned stack make this necessary:

* ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import. If the variable is set later
  (a notebook, a test's ``monkeypatch.setenv``), transformers still tries the network and
  retries for minutes. We read the variable at call time and pass ``local_files_only=True``,
  so an offline miss fails in milliseconds with no socket wait.
* ``CLIPTokenizer.from_pretrained`` of a missing id does **not** raise: it returns an empty
  tokenizer (two special tokens) that maps every word to ``<|endoftext|>``. We check the
  loaded tokenizer and raise instead of training against garbage.
"""

import os

from ipl_diffusion.errors import UserError, UserFileNotFoundError

DEFAULT_CLIP_ID = "openai/clip-vit-base-patch32"  # the paper's ViT-B/32

_TRUE = {"1", "true", "yes", "on"}


def hub_offline():
    """``True`` when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set *now* (read at call time)."""
    if any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # very old/new hub without the constant: env vars above are authoritative
        return False


def _how_to_fix(path_or_id, pass_as=None):
    pass_as = pass_as or "`CLIPPromptEncoder.from_pretrained('./clip')`"
    return (
        f"Download it once on a machine with network access, e.g. "
        f"`hf download {path_or_id} --local-dir ./clip` (or "
        f"`CLIPModel.from_pretrained({path_or_id!r}).save_pretrained('./clip')` plus the tokenizer "
        f"and CLIPImageProcessor), then pass the local folder path instead of the id, e.g. "
        f"{pass_as}."
    )


class CLIPNotFoundError(UserFileNotFoundError):
    """A CLIP component that could not be loaded from ``path_or_id``.

    ``str(err)`` is ``reason`` plus, for a Hub id (``download=True``), how to fetch a local copy
    and pass it to the Python API; :meth:`with_advice` gives the same text for another way of
    passing it (a CLI flag). A local folder's problem is its files, so it gets no download advice.
    """

    def __init__(self, reason: str, path_or_id: str, download: bool = True):
        self.reason, self.path_or_id, self.download = reason, path_or_id, download
        super().__init__(self.with_advice())

    def with_advice(self, pass_as=None) -> str:
        """The message, ending with ``pass_as`` (e.g. ``"`--clip-model ./clip`"``) as the way to
        pass the local copy (default: ``CLIPPromptEncoder.from_pretrained('./clip')``)."""
        return f"{self.reason} {_how_to_fix(self.path_or_id, pass_as)}" if self.download else self.reason


def looks_like_local_path(path_or_id: str) -> bool:
    """Whether ``path_or_id`` can only mean a local path: a Hub id is ``name`` or ``owner/name``,
    so anything absolute, relative (``./``, ``~``), deeper or with a backslash is a folder."""
    return path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") > 1 or "\\" in path_or_id


def load_clip_component(cls, path_or_id, component, **kwargs):
    """``cls.from_pretrained(path_or_id, **kwargs)`` with an actionable error.

    Args:
        cls: a transformers class with ``from_pretrained`` (``CLIPModel``, ``CLIPTokenizer``,
            ``CLIPImageProcessor``).
        path_or_id: a Hub id such as ``"openai/clip-vit-base-patch32"`` or a local folder.
        component: human-readable name used in the error (``"CLIP model"``, ``"CLIP tokenizer"``).
        **kwargs: passed through (``subfolder=``, ``revision=``, ``dtype=``...).

    Returns:
        The loaded object.

    Raises:
        CLIPNotFoundError: (a ``FileNotFoundError``) ``path_or_id`` is neither a loadable local
            folder nor reachable on the Hub (always immediately when offline). The message names
            ``component`` and the class; for a local folder, what is wrong with its files
            (missing, truncated); for a Hub id, how to pass a local copy.
        UserError: ``path_or_id`` is empty.
    """
    from safetensors import SafetensorError

    path_or_id = os.fspath(path_or_id)
    if not path_or_id.strip():
        raise UserError(f"The {component} was given as an empty folder name or Hub id.")
    local = os.path.isdir(path_or_id)
    if os.path.isfile(path_or_id):
        raise CLIPNotFoundError(f"Could not load the {component}: {path_or_id!r} is a file; give the folder that holds "
                                "it.", path_or_id, download=False)
    if not local and looks_like_local_path(path_or_id):  # asking the Hub would only say "bad repo id"
        raise CLIPNotFoundError(f"Could not load the {component}: the folder {path_or_id!r} does not exist.", path_or_id,
                                download=False)
    offline = hub_offline()
    if offline and not local:
        kwargs.setdefault("local_files_only", True)
    try:
        obj = cls.from_pretrained(path_or_id, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:  # transformers: OSError; hub errors subclass it
        if local:  # the folder's files are the problem: say which, not how to download
            cause = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
            raise CLIPNotFoundError(
                f"Could not load the {component} ({cls.__name__}) from the local folder {path_or_id!r}: {cause}. "
                f"A CLIP folder holds what CLIPModel, CLIPTokenizer and CLIPImageProcessor save_pretrained write.",
                path_or_id, download=False,
            ) from err
        mode = " (offline: HF_HUB_OFFLINE is set, so nothing is downloaded)" if offline else ""
        raise CLIPNotFoundError(
            f"Could not load the {component} ({cls.__name__}) from {path_or_id!r} via the Hugging Face Hub cache{mode}.",
            path_or_id,
        ) from err
    return obj


def check_tokenizer(tokenizer, path_or_id, vocab_size=None):
    """Reject the empty tokenizer transformers returns for a missing id, and a tokenizer whose ids
    exceed the text model's vocabulary.

    Raises:
        CLIPNotFoundError: (a ``FileNotFoundError``) the tokenizer holds no vocabulary (missing files).
        UserError: (a ``ValueError``) the tokenizer and the text model disagree on the vocabulary size.
    """
    special = set(tokenizer.all_special_ids)
    probe = tokenizer("a photo", add_special_tokens=False).input_ids
    if len(tokenizer) <= len(special) or not probe or all(i in special for i in probe):
        raise CLIPNotFoundError(
            f"Could not load the CLIP tokenizer (CLIPTokenizer) from {os.fspath(path_or_id)!r}: no vocabulary "
            f"found (vocab.json/merges.txt or tokenizer.json missing).",
            os.fspath(path_or_id), download=not os.path.isdir(path_or_id),  # a local folder's files are missing
        )
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise UserError(
            f"The CLIP tokenizer from {os.fspath(path_or_id)!r} has {len(tokenizer)} tokens but the text model's "
            f"vocabulary has {vocab_size}; they do not belong together."
        )
    return tokenizer
