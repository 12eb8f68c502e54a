"""`load_examples`: (prompt, response) examples from local files or a `datasets` dataset."""

from __future__ import annotations

import codecs
import contextlib
import csv
import os
import re
import tempfile
from typing import Any

import datasets
import pyarrow
import pyarrow.parquet

from jaxunlearn.data._errors import DataError, DataNotFoundError
from jaxunlearn.data._examples import Example, check_unique_ids, content_hash

# File suffix -> `datasets` packaged builder.
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_FORMAT_NAMES = {".jsonl": "JSON Lines", ".json": "JSON", ".csv": "CSV", ".parquet": "Parquet"}
# How much of a text file is read to tell whether it is empty.
_SNIFF_CHARS = 1 << 16
_UTF8_CHUNK_BYTES = 1 << 20
# One part of a Hub repository id (`owner/name`).
_HUB_NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def load_examples(
    source: str | os.PathLike,
    /,
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    id_column: str | None = "id",
    split: str = "train",
) -> list[Example]:
    """Loads examples through `datasets` from a file, a saved dataset folder or a dataset name.

    Every example gets a stable id: the value of `id_column` when the source has that column
    (integers become strings), else `content_hash(prompt, response)`. All columns other than
    prompt, response and id go into `Example.metadata`.

    CSV cells are read as written: an empty cell is an empty string and `NA` stays text, so an
    empty prompt is allowed and an empty response is reported rather than silently dropped.

    A source that exists on disk is always read from disk. One that does not exist is looked
    up on the Hugging Face Hub only when it is a Hub name (`name` or `owner/name`, where
    `owner` is not a local folder); anything that looks like a path (absolute, starting with
    `.` or `~`, with a suffix, with more than one `/`) is reported missing at once.

    Args:
        source: A `.jsonl`, `.json`, `.csv` or `.parquet` file (text files in UTF-8); a folder
            written by `datasets.Dataset.save_to_disk`; a folder of data files; or a dataset
            name on the Hugging Face Hub (which needs network access).
        prompt_column: The column holding the text the model conditions on.
        response_column: The column holding the text the model is scored on.
        id_column: The column of the user's own example ids; `None` to always use content
            hashes.
        split: Which split to read from a dataset with several.

    Returns:
        The examples in the order of the source.

    Raises:
        DataNotFoundError: If `source` looks like a path but does not exist, or is a name the
            Hub does not have (or cannot be reached for). A `DataError` and a
            `FileNotFoundError`.
        DataError: If the source is a file of another format, is not UTF-8 text or cannot be
            parsed, is empty, lacks a prompt or response column, has a missing or non-text
            value or an empty response in some row, or repeats an example id.
    """
    dataset, description = _load_dataset(source, split)
    columns = list(dataset.column_names)
    missing = [name for name in (prompt_column, response_column) if name not in columns]
    if missing:
        raise DataError(
            f"{description} has no column {' or '.join(map(repr, missing))}; its columns are "
            f"{columns}. Name the right ones with prompt_column=... and response_column=...."
        )
    if dataset.num_rows == 0:
        raise DataError(f"{description} has no examples (it is empty).")

    try:
        table = dataset.to_dict()
    except UnicodeDecodeError as error:
        # Arrow stores the bytes of a text column unchecked; they are decoded only here.
        raise DataError(f"{description} holds text that is not UTF-8: {error}") from None
    use_ids = id_column is not None and id_column in columns
    metadata_columns = [
        name
        for name in columns
        if name not in (prompt_column, response_column) and not (use_ids and name == id_column)
    ]
    examples = []
    for row in range(dataset.num_rows):
        prompt = _text(table, prompt_column, row, description)
        response = _text(table, response_column, row, description)
        if not response:
            raise DataError(f"{description}, row {row}: the response is empty; nothing to score.")
        if use_ids:
            example_id = _user_id(table[id_column][row], id_column, row, description)
        else:
            example_id = content_hash(prompt, response)
        metadata = {name: table[name][row] for name in metadata_columns}
        examples.append(Example(example_id, prompt, response, metadata))
    check_unique_ids([example.id for example in examples], description)
    return examples


def _load_dataset(source: str | os.PathLike, split: str) -> tuple[datasets.Dataset, str]:
    """Returns the dataset of `source` and a description of it for error messages.

    Only a name that cannot be a local path reaches the Hub: a path that exists is read from
    disk, and one that does not exist but looks like a path fails at once rather than after a
    network lookup of a mistyped file name.
    """
    name = os.fspath(source)
    path = os.path.expanduser(name)
    suffix = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        description = f"dataset folder {path!r} (split {split!r})"
        if _is_saved_dataset(path):
            loaded = datasets.load_from_disk(path)
            return _select_split(loaded, split, description), description
        return _call_datasets(lambda: datasets.load_dataset(path, split=split), description)
    if os.path.exists(path):
        if suffix not in _FILE_BUILDERS:
            raise DataError(
                f"Cannot read {path!r}: {_suffix_words(suffix)} is not a data format jaxunlearn "
                f"reads. Use a {', '.join(_FILE_BUILDERS)} file, or a folder written by "
                "datasets' save_to_disk."
            )
        return _load_file(path, suffix, split)
    if _looks_like_path(name):
        raise DataNotFoundError(f"No such data file or folder: {path!r}.")
    description = f"dataset {name!r} of the Hugging Face Hub (split {split!r})"
    try:
        return _call_datasets(lambda: datasets.load_dataset(name, split=split), description)
    except (OSError, datasets.exceptions.DatasetsError) as error:
        raise DataNotFoundError(
            f"No data file or folder {path!r} here, and the Hugging Face Hub gave no dataset of "
            f"that name: {error}"
        ) from error


def _load_file(path: str, suffix: str, split: str) -> tuple[datasets.Dataset, str]:
    description = f"data file {path!r}"
    if suffix != ".parquet":
        _check_utf8(path, description)
    if _is_empty_file(path, suffix):
        raise DataError(f"{description} is empty: it holds no examples.")
    builder = _FILE_BUILDERS[suffix]
    options: dict[str, Any] = {}
    if builder == "csv":
        # Text columns stay text ("042" is not the number 42) and empty cells stay "".
        options = {
            "keep_default_na": False,
            "converters": dict.fromkeys(_csv_header(path), str),
        }
    # `datasets` would keep an Arrow copy of the file in its cache, a copy that still holds
    # every example after the user deletes some from the file: it is built in a temporary
    # folder instead, read into memory, and removed.
    with tempfile.TemporaryDirectory(prefix="jaxunlearn-data-") as cache_dir, _quiet_datasets():
        return _call_datasets(
            lambda: datasets.load_dataset(
                builder,
                data_files={split: path},
                split=split,
                cache_dir=cache_dir,
                keep_in_memory=True,
                **options,
            ),
            description,
            file_format=_FORMAT_NAMES[suffix],
        )


@contextlib.contextmanager
def _quiet_datasets():
    """Without `datasets`' "Generating train split" bar: a local file reads in a blink, and
    a command's stderr should hold its own messages."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _looks_like_path(name: str) -> bool:
    """Whether a source that does not exist locally is a mistyped path, not a Hub dataset name.

    Hub names are `name` or `owner/name`, of letters, digits, `-`, `_` and `.`; anything else
    (absolute, starting with `.` or `~`, a suffix such as `.txt`, more than one `/`, a
    backslash, or an `owner/name` whose `owner` is a local folder) is a path.
    """
    if os.path.isabs(name) or name.startswith((".", "~")) or os.path.splitext(name)[1]:
        return True
    parts = name.split("/")
    if len(parts) > 2 or not all(_HUB_NAME_PART.fullmatch(part) for part in parts):
        return True
    return len(parts) == 2 and os.path.isdir(parts[0])


def _suffix_words(suffix: str) -> str:
    return f"the suffix {suffix!r}" if suffix else "a file without a suffix"


def _check_utf8(path: str, description: str) -> None:
    """Raises a DataError naming the first byte of the file that is not UTF-8.

    `datasets` would otherwise fail without naming the file, or accept the bytes and fail later
    when a row is read.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as file:
        while True:
            chunk = file.read(_UTF8_CHUNK_BYTES)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                # `error.object` is the bytes held back from the previous chunk, then this one.
                held = len(error.object) - len(chunk)
                position = offset - held + error.start
                line += error.object[: error.start].count(b"\n")
                byte = error.object[error.start]
                raise DataError(
                    f"{description} is not UTF-8 text: byte 0x{byte:02x} at line {line} (byte "
                    f"offset {position}): {error.reason}. Save the file as UTF-8 (e.g. with "
                    "`iconv -f latin1 -t utf-8`)."
                ) from None
            if not chunk:
                return
            line += chunk.count(b"\n")
            offset += len(chunk)


def _csv_header(path: str) -> list[str]:
    with open(path, encoding="utf-8", newline="") as file:
        return next(csv.reader(file), [])


def _call_datasets(
    load, description: str, *, file_format: str | None = None
) -> tuple[datasets.Dataset, str]:
    try:
        return load(), description
    except datasets.exceptions.DatasetGenerationError as error:
        # datasets' own message ("An error occurred while generating the dataset") names neither
        # the file nor the problem; its cause does.
        cause = error.__cause__ or error.__context__ or error
        what = f"as {file_format}" if file_format else "as data"
        raise DataError(f"{description} cannot be read {what}: {cause}") from error
    except ValueError as error:
        # datasets' wording for a split without rows (e.g. a CSV with only a header).
        if "corresponds to no data" in str(error):
            raise DataError(f"{description} is empty: it holds no examples.") from None
        raise


def _is_saved_dataset(path: str) -> bool:
    """Whether `path` was written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json"))
        and os.path.isfile(os.path.join(path, "dataset_info.json"))
    )


def _select_split(loaded, split: str, description: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{description} has no split {split!r}; it has {sorted(loaded)}.")
        return loaded[split]
    return loaded


def _is_empty_file(path: str, suffix: str) -> bool:
    """Whether a data file holds no rows, checked before `datasets` fails on it obscurely."""
    if os.path.getsize(path) == 0:
        return True
    if suffix == ".parquet":
        try:
            return pyarrow.parquet.ParquetFile(path).metadata.num_rows == 0
        except pyarrow.ArrowInvalid as error:
            raise DataError(f"{path!r} is not a valid Parquet file: {error}") from None
    with open(path, encoding="utf-8", errors="replace") as file:
        head = file.read(_SNIFF_CHARS)
    if len(head) == _SNIFF_CHARS:
        return False  # an empty file is not this long
    lines = [line for line in head.splitlines() if line.strip()]
    if suffix == ".csv":
        return len(lines) <= 1  # nothing, or a header only
    return "".join(lines).replace(" ", "") in ("", "[]")


def _text(table: dict, column: str, row: int, description: str) -> str:
    value = table[column][row]
    if value is None:
        raise DataError(f"{description}, row {row}: column {column!r} has no value.")
    if not isinstance(value, str):
        raise DataError(
            f"{description}, row {row}: column {column!r} must hold text, got "
            f"{type(value).__name__} {value!r}."
        )
    return value


def _user_id(value: Any, column: str, row: int, description: str) -> str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"{description}, row {row}: id column {column!r} must hold a non-empty string or an "
        f"integer, got {value!r}."
    )
