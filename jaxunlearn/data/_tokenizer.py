"""Loading a Hugging Face tokenizer from a local folder and checking it against a model."""

from __future__ import annotations

import os
from typing import Any

import transformers

from jaxunlearn.data._errors import TokenizerMismatchError


def load_tokenizer(path: str | os.PathLike, /) -> transformers.PreTrainedTokenizerBase:
    """Loads a tokenizer with `transformers.AutoTokenizer` from a local folder, never the network.

    Args:
        path: A folder written by `save_pretrained` (e.g. holding `tokenizer.json`), usually the
            model checkpoint's folder.

    Returns:
        The tokenizer (a fast, Rust-backed one when the folder has `tokenizer.json`).

    Raises:
        FileNotFoundError: If `path` is not a folder.
    """
    directory = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No tokenizer folder {directory!r}: pass a local folder written by save_pretrained "
            "(tokenizers are never downloaded)."
        )
    return transformers.AutoTokenizer.from_pretrained(
        directory, local_files_only=True, trust_remote_code=False
    )


def check_tokenizer_fits(tokenizer: transformers.PreTrainedTokenizerBase, model_config: Any, /):
    """Raises unless every id the tokenizer can produce indexes the model's embedding table.

    Args:
        tokenizer: The tokenizer, e.g. from `load_tokenizer`.
        model_config: The model's config; only its `vocab_size` is read.

    Raises:
        TokenizerMismatchError: If the tokenizer's vocabulary (added tokens included) is larger
            than `model_config.vocab_size`, or one of its special-token ids (pad, eos, bos,
            unk) is not a valid row of the embedding table.
    """
    vocab_size = int(model_config.vocab_size)
    tokenizer_size = len(tokenizer)
    vocabulary = tokenizer.get_vocab()
    largest_id = max(vocabulary.values(), default=-1)
    if tokenizer_size > vocab_size or largest_id >= vocab_size:
        raise TokenizerMismatchError(
            f"The tokenizer has {tokenizer_size} tokens (largest id {largest_id}) but the model's "
            f"vocabulary has {vocab_size} (ModelConfig.vocab_size): ids past {vocab_size - 1} "
            "have no embedding. Use the tokenizer that was saved with this checkpoint."
        )
    for role in ("pad", "eos", "bos", "unk"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None and not 0 <= token_id < vocab_size:
            raise TokenizerMismatchError(
                f"The tokenizer's {role} token id {token_id} is outside the model's vocabulary "
                f"of {vocab_size} ids (ModelConfig.vocab_size)."
            )
