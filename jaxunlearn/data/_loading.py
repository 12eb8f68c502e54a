"""`load_examples`: (prompt, response) examples from local files or a `datasets` dataset."""

from __future__ import annotations

import csv
import os
from typing import Any

import datasets
import pyarrow
import pyarrow.parquet

from jaxunlearn.data._errors import DataError
from jaxunlearn.data._examples import Example, check_unique_ids, content_hash

# File suffix -> `datasets` packaged builder.
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# How much of a text file is read to tell whether it is empty.
_SNIFF_CHARS = 1 << 16


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

    Args:
        source: A `.jsonl`, `.json`, `.csv` or `.parquet` file; a folder written by
            `datasets.Dataset.save_to_disk`; a folder of data files; or a dataset name on the
            Hugging Face Hub (which needs network access).
        prompt_column: The column holding the text the model conditions on.
        response_column: The column holding the text the model is scored on.
        id_column: The column of the user's own example ids; `None` to always use content
            hashes.
        split: Which split to read from a dataset with several.

    Returns:
        The examples in the order of the source.

    Raises:
        FileNotFoundError: If `source` looks like a file path but does not exist.
        DataError: If the source is empty, lacks a prompt or response column, has a missing or
            non-text value or an empty response in some row, or repeats an example id.
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

    table = dataset.to_dict()
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
    """Returns the dataset of `source` and a description of it for error messages."""
    path = os.path.expanduser(os.fspath(source))
    suffix = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        description = f"dataset folder {path!r} (split {split!r})"
        if _is_saved_dataset(path):
            loaded = datasets.load_from_disk(path)
            return _select_split(loaded, split, description), description
        return _call_datasets(lambda: datasets.load_dataset(path, split=split), description)
    if suffix in _FILE_BUILDERS:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No such data file: {path!r}.")
        description = f"data file {path!r}"
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
        return _call_datasets(
            lambda: datasets.load_dataset(
                builder, data_files={split: path}, split=split, **options
            ),
            description,
        )
    if os.path.exists(path):
        raise DataError(
            f"Cannot read {path!r}: use a {', '.join(sorted(_FILE_BUILDERS))} file, a folder "
            "saved by datasets, or a dataset name."
        )
    # A missing "notes.txt" or "/data/x" is a mistyped path, not a dataset name to look up.
    if os.path.isabs(path) or suffix[1:].isalpha():
        raise FileNotFoundError(f"No such data file or folder: {path!r}.")
    description = f"dataset {path!r} (split {split!r})"
    return _call_datasets(lambda: datasets.load_dataset(path, split=split), description)


def _csv_header(path: str) -> list[str]:
    with open(path, encoding="utf-8", newline="") as file:
        return next(csv.reader(file), [])


def _call_datasets(load, description: str) -> tuple[datasets.Dataset, str]:
    try:
        return load(), description
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
