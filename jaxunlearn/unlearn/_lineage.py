"""Provenance: what an adapter was made from, and which requests made it what it is.

Every adapter jaxunlearn writes carries a provenance record: content digests of its base
model, tokenizer and training data, the fine-tune's configuration, its training set as it
stands (ids and content hashes, in training order), the requests applied to it in order, its
parent adapter's digest, and the ledger of its lineage. Values that could identify a removed
example are kept only keyed with the ledger's secret.

A jaxunlearn adapter keeps it in its metadata (key `provenance`); a PEFT adapter folder keeps
it in a side file, `jaxunlearn-provenance.json`, that PEFT ignores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flax import nnx

from jaxunlearn.data import Example, json_line, load_examples
from jaxunlearn.errors import UserError
from jaxunlearn.models import LoRALinear, split_lora
from jaxunlearn.unlearn._digests import examples_digest, file_sha256, tree_digest

__all__ = [
    "PEFT_PROVENANCE_FILE",
    "ArtifactMismatchError",
    "Provenance",
    "Sources",
    "adapter_digest",
    "base_model_digest",
    "tokenizer_digest",
]

PROVENANCE_FORMAT = "jaxunlearn.provenance/1"
PEFT_PROVENANCE_FILE = "jaxunlearn-provenance.json"

# The files of a checkpoint folder that decide the computation (not READMEs or caches).
_MODEL_FILES = ("config.json",)
_MODEL_SUFFIXES = (".safetensors", ".safetensors.index.json")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)

# The artifacts `apply_request` checks against an adapter's provenance, by the name a user
# passes to override a check.
ARTIFACTS = ("base_model", "tokenizer", "data")


class ArtifactMismatchError(UserError, ValueError):
    """A base model, tokenizer or data file is not the one the adapter was trained with."""


@dataclasses.dataclass(frozen=True)
class Sources:
    """The files an adapter was made from, as the user gives them.

    Attributes:
        base_model: The base checkpoint folder.
        data: The training data (the adapter's training set; it may still hold examples
            earlier requests removed, which are left out).
        tokenizer: The tokenizer folder (default: `base_model`).
        prompt_column, response_column, id_column: The data's columns.
        max_length, truncate: Tokenization (default: as the adapter was trained).
    """

    base_model: str | os.PathLike
    data: str | os.PathLike
    tokenizer: str | os.PathLike | None = None
    prompt_column: str = "prompt"
    response_column: str = "response"
    id_column: str | None = "id"
    max_length: int | None = None
    truncate: bool | None = None

    def load_examples(self) -> list[Example]:
        return load_examples(
            self.data,
            prompt_column=self.prompt_column,
            response_column=self.response_column,
            id_column=self.id_column,
        )

    @property
    def tokenizer_path(self) -> str | os.PathLike:
        return self.base_model if self.tokenizer is None else self.tokenizer


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where an adapter comes from.

    Attributes:
        base_model: `{"path", "digest"}` of the base checkpoint (digest of its config and
            weight files).
        tokenizer: `{"path", "digest"}` of the tokenizer files.
        data: `{"path", "digest"}` of the training data file as the adapter was trained on it.
        example_ids: The adapter's training set as it stands, in training order (removed
            examples are absent).
        example_hashes: Each example's content hash (prompt and response), aligned with
            `example_ids`; after an edit, the edited version's.
        train_config: The fine-tune's `TrainConfig` as a dict (None: unknown).
        tokenization: `{"max_length", "truncate"}` as trained.
        checkpoints: The fine-tune's checkpoint folder (None: none or unknown).
        ledger: `{"id", "path"}` of the lineage's ledger (None: not yet registered).
        parent: The digest of the adapter this one was made from (None: a root).
        requests: The requests applied along the lineage, in order: `{"record", "kind",
            "method", "request_key", "fingerprint", "num_examples", "approximate"}` with the
            keys and fingerprints keyed by the ledger.
        removed: Keyed id hashes of every example removed along the lineage.
        edited: Ids of the current examples that a request edited.
        verified: False for an adapter that came without provenance (its sources were
            recorded as first given, not checked).
    """

    base_model: Mapping[str, Any]
    tokenizer: Mapping[str, Any] | None
    data: Mapping[str, Any]
    example_ids: tuple[str, ...]
    example_hashes: tuple[str, ...]
    train_config: Mapping[str, Any] | None = None
    tokenization: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    checkpoints: str | None = None
    ledger: Mapping[str, Any] | None = None
    parent: str | None = None
    requests: tuple[Mapping[str, Any], ...] = ()
    removed: tuple[str, ...] = ()
    edited: tuple[str, ...] = ()
    verified: bool = True

    def as_json(self) -> dict[str, Any]:
        """The record as stored (JSON values)."""
        record = dataclasses.asdict(self)
        record["format"] = PROVENANCE_FORMAT
        return json.loads(json_line(record))

    @classmethod
    def from_json(cls, record: Mapping[str, Any], /, *, where: str) -> Provenance:
        if record.get("format") != PROVENANCE_FORMAT:
            raise ArtifactMismatchError(
                f"{where}: provenance format {record.get('format')!r}, this version of "
                f"jaxunlearn reads {PROVENANCE_FORMAT!r}."
            )
        fields = {field.name for field in dataclasses.fields(cls)}
        values = {name: value for name, value in record.items() if name in fields}
        for name in ("example_ids", "example_hashes", "requests", "removed", "edited"):
            values[name] = tuple(values.get(name, ()))
        if len(values["example_ids"]) != len(values["example_hashes"]):
            raise ArtifactMismatchError(f"{where}: its provenance lists ids and hashes unaligned.")
        return cls(**values)

    @classmethod
    def of_training(
        cls,
        *,
        base_model: str | os.PathLike,
        tokenizer: str | os.PathLike | None,
        data: str | os.PathLike,
        examples: Sequence[Example],
        train_config: Mapping[str, Any] | None,
        tokenization: Mapping[str, Any],
        checkpoints: str | os.PathLike | None = None,
        verified: bool = True,
    ) -> Provenance:
        """The provenance of a fine-tune's adapter (a root of a lineage)."""
        return cls(
            base_model={"path": _absolute(base_model), "digest": base_model_digest(base_model)},
            tokenizer=None
            if tokenizer is None
            else {"path": _absolute(tokenizer), "digest": tokenizer_digest(tokenizer)},
            data={"path": _absolute(data), "digest": examples_digest(examples)},
            example_ids=tuple(example.id for example in examples),
            example_hashes=tuple(example.content_hash for example in examples),
            train_config=None if train_config is None else dict(train_config),
            tokenization=dict(tokenization),
            checkpoints=None if checkpoints is None else _absolute(checkpoints),
            verified=verified,
        )

    def replace(self, **changes: Any) -> Provenance:
        return dataclasses.replace(self, **changes)


def read_provenance(metadata: Mapping[str, Any], *, where: str) -> Provenance | None:
    """The provenance stored in an adapter's metadata; None when it has none."""
    record = metadata.get("provenance")
    return None if record is None else Provenance.from_json(record, where=where)


def read_peft_provenance(directory: str | os.PathLike, /) -> Provenance | None:
    path = pathlib.Path(directory) / PEFT_PROVENANCE_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactMismatchError(f"{path} is not a provenance record: {error}") from None
    return Provenance.from_json(record, where=os.fspath(path))


def adapter_digest(model: nnx.Module, provenance: Provenance | None, /) -> str:
    """The digest of an adapter as loaded: its LoRA arrays, every adapted module's rank,
    alpha, scaling and dropout, and its provenance. A changed alpha changes it."""
    _, lora, _ = split_lora(model)
    modules = []
    for path, module in nnx.iter_modules(model):
        if isinstance(module, LoRALinear):
            modules.append(
                [
                    ".".join(str(part) for part in path),
                    module.rank,
                    float(module.alpha),
                    bool(module.use_rslora),
                    0.0 if module.dropout is None else float(module.dropout.rate),
                ]
            )
    description = {
        "arrays": tree_digest(lora),
        "modules": modules,
        "provenance": None if provenance is None else provenance.as_json(),
    }
    return hashlib.sha256(json_line(description).encode()).hexdigest()


def base_model_digest(directory: str | os.PathLike, /) -> str:
    """Digest of a checkpoint folder's config and weight files (names and contents)."""
    return _files_digest(
        directory,
        lambda name: name in _MODEL_FILES or name.endswith(_MODEL_SUFFIXES),
        what="model checkpoint",
    )


def tokenizer_digest(directory: str | os.PathLike, /) -> str:
    """Digest of a folder's tokenizer files (names and contents)."""
    return _files_digest(directory, lambda name: name in _TOKENIZER_FILES, what="tokenizer")


def _files_digest(directory, keep, *, what: str) -> str:
    directory = pathlib.Path(os.path.expanduser(os.fspath(directory)))
    if not directory.is_dir():
        raise FileNotFoundError(f"No {what} folder {os.fspath(directory)!r}.")
    names = sorted(
        entry.name for entry in directory.iterdir() if entry.is_file() and keep(entry.name)
    )
    if not names:
        raise ArtifactMismatchError(f"{os.fspath(directory)} holds no {what} files.")
    digest = hashlib.sha256()
    for name in names:
        digest.update((json.dumps([name, file_sha256(directory / name)]) + "\n").encode())
    return digest.hexdigest()


def _absolute(path: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


@dataclasses.dataclass(frozen=True)
class CurrentData:
    """A data file read against an adapter's provenance.

    Attributes:
        examples: The adapter's training set as it stands, in training order.
        dropped: Examples of the file that earlier requests removed (left out).
    """

    examples: list[Example]
    dropped: list[Example]


def current_examples(
    file_examples: Sequence[Example],
    provenance: Provenance,
    *,
    removed: Iterable[str],
    keyed_id,
    source: str,
    check_contents: bool = True,
) -> CurrentData:
    """The adapter's current training set out of a data file, checked example by example.

    Args:
        file_examples: The examples of the data file given.
        provenance: The adapter's provenance.
        removed: Keyed id hashes of the examples removed along the lineage.
        keyed_id: `id -> keyed id hash` (the ledger's).
        source: The data file's name, for messages.
        check_contents: Compare each example's content hash with the provenance's.

    Raises:
        ArtifactMismatchError: If the file lacks an example the adapter holds, holds one the
            adapter was never trained on, or holds another text for one (naming it).
    """
    by_id = {example.id: example for example in file_examples}
    removed = set(removed)
    missing = [example_id for example_id in provenance.example_ids if example_id not in by_id]
    if missing:
        raise ArtifactMismatchError(
            f"{source} lacks {len(missing)} of the {len(provenance.example_ids)} examples the "
            f"adapter holds (e.g. {missing[0]!r}); pass the adapter's training data and its "
            "column options."
        )
    current_ids = set(provenance.example_ids)
    extra = [example for example in file_examples if example.id not in current_ids]
    dropped = [example for example in extra if keyed_id(example.id) in removed]
    foreign = [example.id for example in extra if keyed_id(example.id) not in removed]
    if foreign:
        raise ArtifactMismatchError(
            f"{source} holds {len(foreign)} examples the adapter was never trained on (e.g. "
            f"{foreign[0]!r}); pass the data the adapter was trained on."
        )
    examples = [by_id[example_id] for example_id in provenance.example_ids]
    if check_contents:
        edited = set(provenance.edited)
        differing = [
            example.id
            for example, expected in zip(examples, provenance.example_hashes, strict=True)
            if example.content_hash != expected
        ]
        if differing:
            first = differing[0]
            why = (
                " It was edited by an earlier request: pass the data with the edit applied."
                if first in edited
                else ""
            )
            raise ArtifactMismatchError(
                f"{source}: {len(differing)} examples differ from the text the adapter was "
                f"trained on (e.g. {first!r}).{why}"
            )
    return CurrentData(examples, dropped)
