"""Tokenizing examples into a `TokenizedDataset` whose batches have a few static lengths."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import transformers

from jaxunlearn.batch import Batch
from jaxunlearn.data._errors import DataError, ExampleTooLongError
from jaxunlearn.data._examples import Example, check_unique_ids
from jaxunlearn.errors import SettingsError

# Batches are padded to the smallest of these lengths that fits, so a jitted function compiles
# at most once per bucket instead of once per distinct batch length. Steps of 1.5x and 4/3x pad
# a batch by at most a third of its length (powers of two: by half), for twice the shapes.
# fmt: off
DEFAULT_BUCKETS = (
    32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192,
)
# fmt: on


class TokenizedDataset:
    """Token ids of examples, with the position where each response starts.

    Build one with `tokenize_examples`. Sequences are stored unpadded; `batch` pads them to a
    bucket length. Treat the attributes as read-only.

    Attributes:
        ids: The example ids, in order; position i of the dataset is example `ids[i]`.
        lengths: int64 [N], number of tokens of each example (BOS, prompt, response, EOS).
        prompt_lengths: int64 [N], number of tokens before the response (BOS included).
        pad_id: The token id that fills padding positions.
        buckets: The static sequence lengths batches are padded to, ascending; the last is
            `max_length`.
        max_length: The longest sequence allowed.
    """

    def __init__(
        self,
        ids: Sequence[str],
        tokens: Sequence[np.ndarray],
        prompt_lengths: Sequence[int],
        *,
        pad_id: int,
        buckets: tuple[int, ...],
        max_length: int,
    ):
        self.ids = list(ids)
        self._tokens = list(tokens)
        self.lengths = np.array([len(t) for t in self._tokens], dtype=np.int64)
        self.prompt_lengths = np.asarray(prompt_lengths, dtype=np.int64).reshape(-1)
        self.pad_id = int(pad_id)
        self.buckets = tuple(buckets)
        self.max_length = int(max_length)
        self._positions = {example_id: i for i, example_id in enumerate(self.ids)}
        check_unique_ids(self.ids, "TokenizedDataset")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"TokenizedDataset({len(self)} examples, buckets={self.buckets}, pad_id={self.pad_id})"
        )

    def index_of(self, example_id: str, /) -> int:
        """The position of the example with id `example_id`.

        Raises:
            KeyError: If no example has that id.
        """
        try:
            return self._positions[example_id]
        except KeyError:
            raise KeyError(f"Unknown example id {example_id!r}: not in this dataset.") from None

    def indices_of(self, example_ids: Iterable[str], /) -> np.ndarray:
        """The positions (int64) of several examples, in the order given.

        Raises:
            KeyError: Naming every id that is not in the dataset.
        """
        example_ids = list(example_ids)
        unknown = [i for i in example_ids if i not in self._positions]
        if unknown:
            shown = ", ".join(map(repr, unknown[:10]))
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise KeyError(f"Unknown example ids {shown}{more}: not in this dataset.")
        return np.array([self._positions[i] for i in example_ids], dtype=np.int64)

    def tokens(self, index: int, /) -> np.ndarray:
        """The int32 token ids of example `index`, unpadded."""
        return self._tokens[self._check_indices([index])[0]]

    def subset(self, indices: Sequence[int] | np.ndarray, /) -> TokenizedDataset:
        """A dataset of the examples at `indices`, in that order.

        Raises:
            IndexError: If an index is out of range.
            DataError: If an index repeats.
        """
        indices = self._check_indices(indices)
        return TokenizedDataset(
            [self.ids[i] for i in indices],
            [self._tokens[i] for i in indices],
            self.prompt_lengths[indices],
            pad_id=self.pad_id,
            buckets=self.buckets,
            max_length=self.max_length,
        )

    def bucket_length(self, indices: Sequence[int] | np.ndarray, /) -> int:
        """The smallest bucket length that holds every example at `indices`."""
        indices = self._check_indices(indices)
        longest = int(self.lengths[indices].max()) if len(indices) else 0
        return next(bucket for bucket in self.buckets if bucket >= longest)

    def batch(
        self, indices: Sequence[int] | np.ndarray, /, *, batch_size: int | None = None
    ) -> Batch:
        """Stacks the examples at `indices` into a right-padded numpy `Batch`.

        Args:
            indices: Positions of the examples, in the order of the batch rows.
            batch_size: The number of rows; rows past `len(indices)` are all padding and have
                `example_mask` False, so that the last, short batch keeps a static shape.
                Defaults to `len(indices)`.

        Returns:
            A `Batch` of shape [batch_size, T], T the smallest bucket that fits the longest
            example: `input_ids` int32 (pad id at padding), `attention_mask` int32,
            `loss_mask` float32 (1 exactly at response tokens, EOS included) and
            `example_mask` bool.

        Raises:
            IndexError: If an index is out of range.
            ValueError: If `batch_size` is smaller than the number of indices, or neither gives
                a row.
        """
        indices = self._check_indices(indices, allow_repeats=True)
        rows = len(indices) if batch_size is None else int(batch_size)
        if rows < len(indices):
            raise ValueError(f"batch_size {rows} is smaller than the {len(indices)} indices.")
        if rows == 0:
            raise ValueError("A batch needs at least one row: pass indices or a batch_size.")
        length = self.bucket_length(indices)
        input_ids = np.full((rows, length), self.pad_id, dtype=np.int32)
        attention_mask = np.zeros((rows, length), dtype=np.int32)
        loss_mask = np.zeros((rows, length), dtype=np.float32)
        example_mask = np.zeros((rows,), dtype=bool)
        for row, index in enumerate(indices):
            tokens = self._tokens[index]
            input_ids[row, : len(tokens)] = tokens
            attention_mask[row, : len(tokens)] = 1
            loss_mask[row, self.prompt_lengths[index] : len(tokens)] = 1.0
            example_mask[row] = True
        return Batch(input_ids, attention_mask, loss_mask, example_mask)

    def _check_indices(self, indices, allow_repeats: bool = False) -> np.ndarray:
        indices = np.asarray(indices).reshape(-1)
        if indices.size == 0:
            return indices.astype(np.int64)
        if not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"Example indices must be integers, got dtype {indices.dtype}.")
        bad = indices[(indices < 0) | (indices >= len(self))]
        if bad.size:
            raise IndexError(
                f"Example indices {bad[:10].tolist()} are out of range for a dataset of "
                f"{len(self)} examples."
            )
        if not allow_repeats and len(np.unique(indices)) != len(indices):
            raise DataError("Example indices repeat; a dataset holds each example once.")
        return indices.astype(np.int64)


def tokenize_examples(
    examples: Iterable[Example],
    tokenizer: transformers.PreTrainedTokenizerBase,
    /,
    *,
    max_length: int,
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
    truncate: bool = False,
    add_eos: bool = True,
) -> TokenizedDataset:
    """Tokenizes examples as [BOS] prompt response [EOS], marking where the response starts.

    Prompt and response are tokenized separately and their ids concatenated, so the boundary
    between them is exact: no token straddles it. Texts therefore should split at a word
    boundary the way the tokenizer splits words: for byte-level BPE (GPT-2, Llama 3) the
    response starts with the space ("The capital is" + " Paris."). BOS is prepended when the
    tokenizer itself adds it to a text.

    Args:
        examples: The examples; their ids must be unique.
        tokenizer: A Hugging Face tokenizer, e.g. from `load_tokenizer`. Its pad token pads
            batches; without one, its EOS token does.
        max_length: The longest allowed sequence, usually the model's
            `max_position_embeddings`.
        buckets: Sequence lengths that batches are padded to. Lengths above `max_length` are
            dropped and `max_length` is always the last bucket; `None` pads every batch to
            `max_length`.
        truncate: Whether to shorten examples longer than `max_length` instead of raising: the
            prompt loses tokens from its start first (BOS kept); if the response alone is too
            long, the prompt is dropped and the response loses tokens from its end (EOS too).
        add_eos: Whether to end each sequence with the tokenizer's EOS token, scored as part of
            the response so the model learns where answers stop.

    Returns:
        The tokenized dataset, in the order of `examples`.

    Raises:
        DataError: If there are no examples, ids repeat, a response is empty or tokenizes to
            nothing, or the tokenizer lacks the EOS / pad token that is needed.
        ExampleTooLongError: If an example is longer than `max_length` and `truncate` is
            False; the message names the examples and their lengths.
        SettingsError: If `max_length` is not an integer of at least 2, or a bucket length is
            not a positive integer.
    """
    examples = list(examples)
    if not examples:
        raise DataError("No examples to tokenize.")
    if not isinstance(max_length, int) or max_length < 2:
        raise SettingsError(f"max_length must be an integer of at least 2, got {max_length!r}.")
    check_unique_ids([example.id for example in examples], "tokenize_examples")
    empty = [example.id for example in examples if not example.response]
    if empty:
        raise DataError(f"Examples {empty[:10]} have an empty response; nothing would be scored.")

    eos_id = tokenizer.eos_token_id
    if add_eos and eos_id is None:
        raise DataError("The tokenizer has no EOS token; pass add_eos=False to train without one.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if pad_id is None:
        raise DataError("The tokenizer has neither a pad token nor an EOS token to pad with.")
    prefix = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    suffix = [eos_id] if add_eos else []

    prompt_ids = _encode(tokenizer, [example.prompt for example in examples])
    response_ids = _encode(tokenizer, [example.response for example in examples])
    tokens, prompt_lengths, too_long = [], [], []
    for example, prompt, response in zip(examples, prompt_ids, response_ids, strict=True):
        if not response:
            raise DataError(f"Example {example.id!r}: the response tokenizes to no tokens.")
        prompt = prefix + prompt
        response = response + suffix
        length = len(prompt) + len(response)
        if length > max_length:
            if not truncate:
                too_long.append((example.id, length))
                continue
            prompt, response = _truncate(example.id, prompt, response, len(prefix), max_length)
        tokens.append(np.array(prompt + response, dtype=np.int32))
        prompt_lengths.append(len(prompt))
    if too_long:
        shown = ", ".join(
            f"{example_id!r} ({length} tokens)" for example_id, length in too_long[:10]
        )
        more = f" and {len(too_long) - 10} more" if len(too_long) > 10 else ""
        raise ExampleTooLongError(
            f"{len(too_long)} of {len(examples)} examples are longer than max_length={max_length}: "
            f"{shown}{more}. "
            "Shorten them, raise max_length (up to the model's context), or pass truncate=True."
        )
    return TokenizedDataset(
        [example.id for example in examples],
        tokens,
        prompt_lengths,
        pad_id=pad_id,
        buckets=_bucket_lengths(buckets, max_length),
        max_length=max_length,
    )


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token in front of a text when asked for special tokens."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos_id] and without[:1] != [bos_id]


def _truncate(example_id, prompt, response, prefix_length, max_length):
    """Shortens prompt (from the left, after the prefix) then response (from the right)."""
    prompt_budget = max_length - len(response)
    if prompt_budget >= prefix_length:
        kept = prompt_budget - prefix_length
        return prompt[:prefix_length] + prompt[len(prompt) - kept :], response
    response_budget = max_length - prefix_length
    if response_budget < 1:
        raise DataError(
            f"Example {example_id!r}: max_length={max_length} leaves no room for the response."
        )
    return prompt[:prefix_length], response[:response_budget]


def _bucket_lengths(buckets: Sequence[int] | None, max_length: int) -> tuple[int, ...]:
    if buckets is None:
        return (max_length,)
    buckets = list(buckets)
    if any(not isinstance(b, int | np.integer) or b < 1 for b in buckets):
        raise SettingsError(f"Bucket lengths must be positive integers, got {buckets}.")
    kept = sorted({int(b) for b in buckets if b < max_length})
    return (*kept, max_length)
