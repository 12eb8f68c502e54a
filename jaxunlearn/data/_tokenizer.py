"""Loading a Hugging Face tokenizer from a local folder and checking it against a model."""

from __future__ import annotations

import json
import os
from typing import Any

import transformers

from jaxunlearn.data._errors import DataError, DataNotFoundError, TokenizerMismatchError

_TOKENIZER_FILE = "tokenizer.json"
# The text files `save_pretrained` writes for the tokenizers transformers can load without
# remote code; each is checked before transformers reads it, so that an error names the file.
_TOKENIZER_TEXT_FILES = (
    _TOKENIZER_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def load_tokenizer(path: str | os.PathLike, /) -> transformers.PreTrainedTokenizerBase:
    """Loads a tokenizer with `transformers.AutoTokenizer` from a local folder, never the network.

    Args:
        path: A folder written by `save_pretrained` (e.g. holding `tokenizer.json`), usually the
            model checkpoint's folder.

    Returns:
        The tokenizer (a fast, Rust-backed one when the folder has `tokenizer.json`).

    Raises:
        DataNotFoundError: If `path` is not a folder (also a `FileNotFoundError`).
        DataError: If a tokenizer file is not UTF-8 or not valid JSON (the error names the
            file), or transformers cannot build a tokenizer from the folder.
    """
    directory = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(directory):
        raise DataNotFoundError(
            f"No tokenizer folder {directory!r}: pass a local folder written by save_pretrained "
            "(tokenizers are never downloaded)."
        )
    for name in _TOKENIZER_TEXT_FILES:
        _check_text_file(os.path.join(directory, name))
    try:
        return transformers.AutoTokenizer.from_pretrained(
            directory, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, LookupError, TypeError) as error:
        raise DataError(
            f"Cannot load the tokenizer in {directory!r}: {type(error).__name__}: {error}"
        ) from error
    except Exception as error:
        # The Rust `tokenizers` library reports a malformed tokenizer.json as a bare Exception;
        # anything more specific is not a problem of the files and keeps its traceback.
        if type(error) is not Exception:
            raise
        raise DataError(
            f"Cannot load the tokenizer in {directory!r}: {_TOKENIZER_FILE} does not describe "
            f"a tokenizer ({error})."
        ) from error


def _check_text_file(path: str) -> None:
    """Raises a DataError naming `path` if it exists and is not UTF-8 (or not JSON, for .json)."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as file:
        data = file.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(
            f"Tokenizer file {path!r} is not UTF-8: byte 0x{data[error.start]:02x} at line "
            f"{line} (byte offset {error.start}): {error.reason}."
        ) from None
    if path.endswith(".json"):
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"Tokenizer file {path!r} is not valid JSON: {error}.") from None


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
