"""The errors raised for bad data, so that callers can catch them apart from other failures."""

from jaxunlearn.errors import UserError


class DataError(UserError, ValueError):
    """A data source cannot be used as examples: missing columns, no rows, duplicate ids, ..."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data file, data folder or tokenizer folder does not exist.

    Also a `FileNotFoundError`, which callers caught before this type existed.
    """


class ExampleTooLongError(DataError):
    """A tokenized example does not fit the context length and truncation was not asked for."""


class TokenizerMismatchError(UserError, ValueError):
    """A tokenizer produces token ids that the model's embedding table does not have."""
