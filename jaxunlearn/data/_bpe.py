"""Training a byte-level BPE tokenizer and saving it in Hugging Face format.

The embedded default model needs a tokenizer that nobody has to download; users with their own
checkpoint use its own tokenizer instead. Byte-level BPE never produces an unknown token, so any
text (names, e-mail addresses, ID numbers) round-trips exactly.
"""

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from jaxunlearn.errors import SettingsError

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"


def train_bpe_tokenizer(
    texts: Iterable[str], /, *, vocab_size: int, out_dir: str | os.PathLike
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on `texts` and saves it to `out_dir`.

    The tokenizer prepends `<s>` to every encoded text, has `</s>` as end-of-sequence token
    and `<pad>` as padding token (ids 1, 2 and 0), and loads back with
    `transformers.AutoTokenizer.from_pretrained(out_dir)`. Training is deterministic for the
    same texts in the same order.

    Args:
        texts: the training corpus.
        vocab_size: the vocabulary size, special tokens and the 256 byte symbols included.
        out_dir: the folder to write (created if needed).

    Returns:
        The trained tokenizer.

    Raises:
        SettingsError: If `vocab_size` cannot hold the 256 byte symbols and the specials.
    """
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + 3
    if vocab_size < minimum:
        raise SettingsError(
            f"vocab_size must be at least {minimum} (bytes + specials), got {vocab_size}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(os.fspath(out_dir))
    return tokenizer
