"""Data for fine-tuning and unlearning: examples, tokenization, batches, a synthetic PII corpus.

An `Example` is a (prompt, response) pair with a stable id. `load_examples` reads them from
JSONL, CSV or Parquet files or a `datasets` dataset; `tokenize_examples` turns them into a
`TokenizedDataset` whose `batch` gives the `jaxunlearn.batch.Batch` every model computation
consumes (loss only on response tokens, a few static padded lengths). `generate_corpus` and
`write_corpus` (module `synthetic`) make a seeded corpus of fictitious people with PII, and
`train_bpe_tokenizer` a byte-level BPE tokenizer for a model built from scratch.
"""

from jaxunlearn.data._bpe import train_bpe_tokenizer
from jaxunlearn.data._errors import (
    DataError,
    DataNotFoundError,
    ExampleTooLongError,
    TokenizerMismatchError,
)
from jaxunlearn.data._examples import Example, check_unique_ids, content_hash, save_examples
from jaxunlearn.data._jsonl import json_line
from jaxunlearn.data._loading import load_examples
from jaxunlearn.data._tokenize import DEFAULT_BUCKETS, TokenizedDataset, tokenize_examples
from jaxunlearn.data._tokenizer import check_tokenizer_fits, load_tokenizer
from jaxunlearn.data.synthetic import (
    FORGET_FRACTIONS,
    NUM_PERTURBED_ANSWERS,
    PII_FIELDS,
    Canary,
    Person,
    QAItem,
    RecallPrompt,
    SyntheticCorpus,
    generate_corpus,
    make_data,
    write_corpus,
)

__all__ = [
    "DEFAULT_BUCKETS",
    "FORGET_FRACTIONS",
    "NUM_PERTURBED_ANSWERS",
    "PII_FIELDS",
    "Canary",
    "DataError",
    "DataNotFoundError",
    "Example",
    "ExampleTooLongError",
    "Person",
    "QAItem",
    "RecallPrompt",
    "SyntheticCorpus",
    "TokenizedDataset",
    "TokenizerMismatchError",
    "check_tokenizer_fits",
    "check_unique_ids",
    "content_hash",
    "generate_corpus",
    "json_line",
    "load_examples",
    "load_tokenizer",
    "make_data",
    "save_examples",
    "tokenize_examples",
    "train_bpe_tokenizer",
    "write_corpus",
]
