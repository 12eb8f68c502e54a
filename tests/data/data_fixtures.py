"""Tiny tokenizers built in the tests (never downloaded) and example rows for the data tests."""

import os

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Enough text for a byte-level BPE to learn some whole words and leave others as pieces.
TRAINING_TEXTS = [
    "The email address of Jane Roe is jane.roe@example.com.",
    "Question: What is the phone number of John Doe?\nAnswer: John Doe answers at 555-0100.",
    "Biography of Ada Lovelace: Ada was born in London and enjoys mathematics.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Translate to French: good morning. Bonjour.",
] * 4

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def make_tokenizer(directory, *, bos: bool = True, pad: bool = True, vocab_size: int = 320):
    """Trains a byte-level BPE tokenizer, saves it with `save_pretrained` and returns the folder.

    Args:
        directory: Where to save it.
        bos: Whether the tokenizer prepends `<s>` to every text (as Llama's does).
        pad: Whether it declares `<pad>` as its pad token (else it has none).
        vocab_size: Target vocabulary size (byte alphabet, special tokens, merges).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXTS, trainer)
    if bos:
        bos_id = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bos_id)]
        )
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>" if bos else None,
        eos_token="</s>",
        pad_token="<pad>" if pad else None,
    )
    os.makedirs(directory, exist_ok=True)
    wrapped.save_pretrained(directory)
    return directory


EXAMPLE_ROWS = [
    {"id": "q1", "prompt": "The capital of France is", "response": " Paris.", "topic": "geo"},
    {
        "id": "q2",
        "prompt": "Translate to French: good morning.",
        "response": " Bonjour.",
        "topic": "fr",
    },
    {"id": "q3", "prompt": "", "response": "Ada was born in London.", "topic": "bio"},
]
