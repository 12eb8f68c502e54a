"""Tokenization: the loss mask, padding to buckets, truncation, and the tokenizer checks."""

import types

import numpy as np
import pytest
from data_fixtures import EXAMPLE_ROWS, make_tokenizer

from jaxunlearn.data import (
    DataError,
    DataNotFoundError,
    Example,
    ExampleTooLongError,
    TokenizerMismatchError,
    check_tokenizer_fits,
    generate_corpus,
    load_tokenizer,
    tokenize_examples,
)
from jaxunlearn.errors import SettingsError, UserError
from jaxunlearn.models import ModelConfig

EXAMPLES = [Example(r["id"], r["prompt"], r["response"]) for r in EXAMPLE_ROWS]


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _model_config(vocab_size):
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=8,
        intermediate_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
    )


@pytest.mark.parametrize("tokenizer_name", ["bos_tokenizer", "plain_tokenizer"])
def test_loss_mask_marks_exactly_the_response_tokens(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    dataset = tokenize_examples(EXAMPLES, tokenizer, max_length=64, buckets=(16, 32))
    batch = dataset.batch(np.arange(len(EXAMPLES)))
    assert batch.input_ids.dtype == np.int32
    assert batch.attention_mask.dtype == np.int32
    assert batch.loss_mask.dtype == np.float32
    assert batch.example_mask.dtype == bool
    adds_bos = tokenizer_name == "bos_tokenizer"
    pad_id = tokenizer.pad_token_id if adds_bos else tokenizer.eos_token_id
    for row, example in enumerate(EXAMPLES):
        prefix = [tokenizer.bos_token_id] if adds_bos else []
        prompt = prefix + _ids(tokenizer, example.prompt)
        response = [*_ids(tokenizer, example.response), tokenizer.eos_token_id]
        length = len(prompt) + len(response)
        np.testing.assert_array_equal(batch.input_ids[row, :length], prompt + response)
        np.testing.assert_array_equal(batch.input_ids[row, length:], pad_id)
        expected_mask = np.zeros(batch.input_ids.shape[1])
        expected_mask[len(prompt) : length] = 1
        np.testing.assert_array_equal(batch.loss_mask[row], expected_mask)
        np.testing.assert_array_equal(
            batch.attention_mask[row], np.arange(len(expected_mask)) < length
        )
        # The scored tokens decode to the response text and nothing else.
        scored = batch.input_ids[row][batch.loss_mask[row] == 1]
        assert scored[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(scored[:-1].tolist()) == example.response
    assert batch.example_mask.all()


def test_split_boundary_matches_joint_tokenization_at_a_word_boundary(bos_tokenizer):
    # With the space at the start of the response, prompt + response tokenizes the same way
    # split or joined, so a model sees in training the tokens a joint prompt will give it.
    example = EXAMPLES[0]
    dataset = tokenize_examples([example], bos_tokenizer, max_length=64)
    joint = bos_tokenizer(example.prompt + example.response)["input_ids"]
    assert dataset.tokens(0).tolist() == [*joint, bos_tokenizer.eos_token_id]


def test_batches_pad_to_the_smallest_fitting_bucket(bos_tokenizer):
    long_example = Example(
        "long", "The capital of France is Paris. The capital of Italy is", " Rome."
    )
    dataset = tokenize_examples(
        [*EXAMPLES, long_example], bos_tokenizer, max_length=48, buckets=(8, 16, 32, 64, 128)
    )
    assert dataset.buckets == (8, 16, 32, 48)
    short = np.flatnonzero(dataset.lengths <= 16)
    assert short.size > 0
    assert dataset.batch(short).input_ids.shape == (short.size, 16)
    everything = dataset.batch(np.arange(len(dataset)))
    assert everything.input_ids.shape[1] == 32 >= dataset.lengths.max()
    fixed = tokenize_examples(EXAMPLES, bos_tokenizer, max_length=40, buckets=None)
    assert fixed.buckets == (40,)
    assert fixed.batch([0]).input_ids.shape == (1, 40)


def test_batch_size_pads_with_rows_that_are_not_examples(bos_tokenizer):
    dataset = tokenize_examples(EXAMPLES, bos_tokenizer, max_length=64)
    batch = dataset.batch(np.array([2, 0]), batch_size=4)
    assert batch.input_ids.shape == (4, dataset.batch(np.array([2, 0])).input_ids.shape[1])
    np.testing.assert_array_equal(batch.example_mask, [True, True, False, False])
    np.testing.assert_array_equal(batch.input_ids[2:], bos_tokenizer.pad_token_id)
    assert not batch.attention_mask[2:].any()
    assert not batch.loss_mask[2:].any()
    np.testing.assert_array_equal(batch.input_ids[0], dataset.batch([2], batch_size=1).input_ids[0])
    with pytest.raises(ValueError, match="smaller than the 2 indices"):
        dataset.batch([0, 1], batch_size=1)


def test_loss_of_the_batch_scores_only_response_tokens(bos_tokenizer):
    import jax.numpy as jnp

    from jaxunlearn.batch import example_losses

    dataset = tokenize_examples(EXAMPLES, bos_tokenizer, max_length=64, buckets=(32,))
    batch = dataset.batch([0, 1], batch_size=3)
    vocab = len(bos_tokenizer)
    # Logits that put probability 1/2 on the true next token and spread the rest uniformly.
    logits = np.zeros((*batch.input_ids.shape, vocab), np.float32)
    rows, cols = np.indices((batch.input_ids.shape[0], batch.input_ids.shape[1] - 1))
    logits[rows, cols, batch.input_ids[:, 1:]] = np.log(vocab - 1)
    losses = example_losses(jnp.asarray(logits), batch)
    np.testing.assert_allclose(losses, [np.log(2), np.log(2), 0.0], rtol=1e-5)


def test_index_lookup_and_subsets(bos_tokenizer):
    dataset = tokenize_examples(EXAMPLES, bos_tokenizer, max_length=64)
    assert dataset.ids == ["q1", "q2", "q3"]
    assert len(dataset) == 3
    assert dataset.index_of("q3") == 2
    subset = dataset.subset(dataset.indices_of(["q3", "q1"]))
    assert subset.ids == ["q3", "q1"]
    np.testing.assert_array_equal(subset.tokens(1), dataset.tokens(0))
    np.testing.assert_array_equal(subset.lengths, dataset.lengths[[2, 0]])
    with pytest.raises(KeyError, match="Unknown example id 'nope'"):
        dataset.index_of("nope")
    with pytest.raises(KeyError, match="'x', 'y'"):
        dataset.indices_of(["q1", "x", "y"])
    with pytest.raises(IndexError, match=r"\[3\] are out of range"):
        dataset.batch([0, 3])


def test_too_long_example_is_named_unless_truncation_is_asked(bos_tokenizer):
    long_prompt = Example("long-prompt", "word " * 30 + "is", " the end.")
    length = (
        1 + len(_ids(bos_tokenizer, long_prompt.prompt)) + len(_ids(bos_tokenizer, " the end.")) + 1
    )
    with pytest.raises(
        ExampleTooLongError, match=rf"'long-prompt' \({length} tokens\).*truncate=True"
    ):
        tokenize_examples([EXAMPLES[0], long_prompt], bos_tokenizer, max_length=16)

    dataset = tokenize_examples([long_prompt], bos_tokenizer, max_length=16, truncate=True)
    tokens = dataset.tokens(0).tolist()
    response = [*_ids(bos_tokenizer, " the end."), bos_tokenizer.eos_token_id]
    prompt = _ids(bos_tokenizer, long_prompt.prompt)
    kept = 16 - 1 - len(response)
    # BOS, then the end of the prompt, then the whole response.
    assert tokens == [bos_tokenizer.bos_token_id, *prompt[-kept:], *response]
    assert dataset.prompt_lengths[0] == 1 + kept


def test_response_longer_than_the_context_is_cut_from_the_right(bos_tokenizer):
    long_response = Example("long-response", "Say:", " word" * 30)
    dataset = tokenize_examples([long_response], bos_tokenizer, max_length=12, truncate=True)
    response = _ids(bos_tokenizer, long_response.response)
    assert dataset.tokens(0).tolist() == [bos_tokenizer.bos_token_id, *response[:11]]
    batch = dataset.batch([0])
    np.testing.assert_array_equal(batch.loss_mask[0], [0] + [1] * 11)


def test_empty_response_is_an_error(bos_tokenizer):
    with pytest.raises(DataError, match=r"\['blank'\] have an empty response"):
        tokenize_examples(
            [EXAMPLES[0], Example("blank", "prompt", "")], bos_tokenizer, max_length=64
        )


def test_tokenizer_without_pad_pads_with_eos(plain_tokenizer):
    assert plain_tokenizer.pad_token_id is None
    dataset = tokenize_examples(EXAMPLES, plain_tokenizer, max_length=64)
    assert dataset.pad_id == plain_tokenizer.eos_token_id


def test_tokenizer_that_fits_the_model_passes(bos_tokenizer):
    check_tokenizer_fits(bos_tokenizer, _model_config(len(bos_tokenizer)))
    check_tokenizer_fits(bos_tokenizer, _model_config(len(bos_tokenizer) + 64))


def test_tokenizer_larger_than_the_vocabulary_is_an_error(bos_tokenizer):
    size = len(bos_tokenizer)
    with pytest.raises(
        TokenizerMismatchError, match=rf"has {size} tokens.*vocabulary has {size - 1}"
    ):
        check_tokenizer_fits(bos_tokenizer, _model_config(size - 1))


def test_special_token_outside_the_vocabulary_is_an_error():
    # A tokenizer whose pad id points past its own vocabulary (as some hand-edited configs do).
    class BrokenTokenizer:
        pad_token_id, eos_token_id, bos_token_id, unk_token_id = 99, 1, None, None

        def __len__(self):
            return 10

        def get_vocab(self):
            return {f"t{i}": i for i in range(10)}

    with pytest.raises(TokenizerMismatchError, match="pad token id 99 is outside"):
        check_tokenizer_fits(BrokenTokenizer(), types.SimpleNamespace(vocab_size=32))


def test_load_tokenizer_needs_a_local_folder(tmp_path):
    with pytest.raises(DataNotFoundError, match="No tokenizer folder"):
        load_tokenizer(tmp_path / "absent")
    # Also a FileNotFoundError, which callers caught before DataNotFoundError existed.
    with pytest.raises(FileNotFoundError, match="No tokenizer folder"):
        load_tokenizer(tmp_path / "absent")


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok_source"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("tokenizer.json", b'{"model": "caf\xe9"}', r"tokenizer\.json' is not UTF-8: byte 0xe9"),
        ("tokenizer.json", b"{not json", r"tokenizer\.json' is not valid JSON"),
        ("tokenizer_config.json", b'{"a": 1,\n"b": "\xff"}', r"config\.json' .*line 2"),
        ("tokenizer_config.json", b"", r"tokenizer_config\.json' is not valid JSON"),
        # Valid JSON that does not describe a tokenizer: transformers or tokenizers refuse it.
        ("tokenizer.json", b'{"version": "1.0"}', "Cannot load the tokenizer in"),
        ("tokenizer.json", b'{"version": "1.0", "added_tokens": [], "model": 3}', "Cannot load"),
    ],
)
def test_an_unreadable_tokenizer_file_is_a_data_error_naming_it(
    tmp_path, tokenizer_folder, name, content, message
):
    import shutil

    folder = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_folder, folder)
    (folder / name).write_bytes(content)
    with pytest.raises(DataError, match=message) as caught:
        load_tokenizer(folder)
    assert isinstance(caught.value, UserError)


def test_without_eos_the_response_ends_the_sequence(bos_tokenizer):
    dataset = tokenize_examples(EXAMPLES[:1], bos_tokenizer, max_length=64, add_eos=False)
    response = _ids(bos_tokenizer, EXAMPLES[0].response)
    assert dataset.tokens(0).tolist()[-len(response) :] == response
    assert dataset.lengths[0] - dataset.prompt_lengths[0] == len(response)


def test_synthetic_examples_split_where_joint_tokenization_splits(bos_tokenizer):
    # Recall prompts are fed to the model as one text: their tokens must be the ones that
    # preceded the PII value in training.
    corpus = generate_corpus(6, seed=0, canaries=1)
    examples = corpus.train_examples()
    dataset = tokenize_examples(examples, bos_tokenizer, max_length=512)
    for index, example in enumerate(examples):
        joint = bos_tokenizer(example.prompt + example.response)["input_ids"]
        assert dataset.tokens(index).tolist() == [*joint, bos_tokenizer.eos_token_id]
    for person_id, field, prompt, _ in corpus.recall_prompts():
        tokens = dataset.tokens(dataset.index_of(f"{person_id}/fact/{field}")).tolist()
        prompt_tokens = bos_tokenizer(prompt)["input_ids"]
        assert tokens[: len(prompt_tokens)] == prompt_tokens


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_length": 1}, "max_length must be an integer of at least 2"),
        ({"max_length": 64.0}, "max_length must be an integer"),
        ({"max_length": 64, "buckets": (0, 32)}, "Bucket lengths must be positive integers"),
    ],
)
def test_bad_tokenization_settings_are_settings_errors(bos_tokenizer, options, message):
    with pytest.raises(SettingsError, match=message) as caught:
        tokenize_examples(EXAMPLES, bos_tokenizer, **options)
    assert isinstance(caught.value, UserError)
    assert isinstance(caught.value, ValueError)
