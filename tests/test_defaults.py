"""The embedded default: built once from its recipe, cached, validated, rebuilt when damaged."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.defaults import DEFAULT_RECIPE, DefaultRecipe, cache_root, ensure_defaults

# A recipe small enough to build in seconds; same code path as the real default.
TINY = DefaultRecipe(
    private_people=6,
    public_people=8,
    held_out_fraction=0.34,
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    max_length=192,
    buckets=(64, 128, 192),
    pretrain_steps=4,
    pretrain_batch_size=8,
)


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, ensure_defaults(cache, recipe=TINY, progress=False)


def test_build_writes_a_loadable_tokenizer_model_and_corpus(built):
    _, assets = built
    tokenizer = assets.tokenizer()
    model = assets.model()
    assert len(tokenizer) == TINY.vocab_size
    assert model.config == TINY.model_config()
    ids = jnp.asarray([tokenizer("The email address of")["input_ids"]])
    assert model(ids).shape == (1, ids.shape[1], TINY.vocab_size)
    assert (assets.corpus_dir / "train.jsonl").is_file()
    corpus = assets.corpus()
    assert len(corpus.public) == TINY.public_people
    assert len(corpus.people) + len(corpus.held_out) == TINY.private_people


def test_pre_training_moved_the_base_away_from_its_random_initialization(built):
    import jax

    from jaxunlearn.models import from_config

    _, assets = built
    trained = assets.model()
    initial = from_config(TINY.model_config(), key=jax.random.key(TINY.seed))
    difference = np.abs(
        np.asarray(trained.model.embed_tokens[...]) - np.asarray(initial.model.embed_tokens[...])
    )
    assert difference.max() > 0


def test_the_tokenizer_never_saw_private_text(built):
    _, assets = built
    corpus = assets.corpus()
    vocabulary = {token.replace("Ġ", "") for token in assets.tokenizer().get_vocab()}
    # Long merged tokens come from frequent strings of the training text: no private surname
    # or e-mail user name of five letters or more may be one of them unless public text has it.
    public_text = " ".join(e.prompt + e.response for e in corpus.public_examples())
    for person in corpus.people + corpus.held_out:
        for word in [*person.name.split(), person.email.split("@")[0]]:
            if len(word) >= 5 and word not in public_text:
                assert word not in vocabulary, word


def test_a_valid_cache_is_reused_without_rebuilding(built):
    cache, assets = built
    before = (assets.model_dir / "model.safetensors").stat().st_mtime_ns
    again = ensure_defaults(cache, recipe=TINY, progress=False)
    assert again == assets
    assert (assets.model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_a_corrupted_cache_is_rebuilt_identically(built):
    cache, assets = built
    weights = assets.model_dir / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])
    rebuilt = ensure_defaults(cache, recipe=TINY, progress=False)
    assert rebuilt.root == assets.root
    assert weights.read_bytes() == original  # the build is deterministic for the recipe


def test_cache_location_follows_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXUNLEARN_CACHE", str(tmp_path / "from-env"))
    assert cache_root() == tmp_path / "from-env"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("JAXUNLEARN_CACHE")
    assert cache_root().name == "jaxunlearn"


def test_recipes_that_differ_are_cached_apart():
    changed = dataclasses.replace(DEFAULT_RECIPE, pretrain_steps=DEFAULT_RECIPE.pretrain_steps + 1)
    assert changed.fingerprint() != DEFAULT_RECIPE.fingerprint()
    assert DefaultRecipe().fingerprint() == DEFAULT_RECIPE.fingerprint()


def test_building_prints_nothing_on_stdout(tmp_path, capfd):
    """`jaxunlearn defaults` and `demo --json` print JSON alone on stdout: progress goes to stderr.

    capfd reads the file descriptors, so output of native code (tokenizers, XLA) counts too.
    """
    ensure_defaults(tmp_path / "cache", recipe=TINY, progress=True)
    captured = capfd.readouterr()
    assert captured.out == ""
    assert "built the embedded default" in captured.err
    ensure_defaults(tmp_path / "cache", recipe=TINY, progress=True)  # cached: no build
    assert capfd.readouterr().out == ""


def test_training_provenance_names_the_default_and_refuses_an_edited_training_file(built, tmp_path):
    import shutil

    from jaxunlearn.data import load_examples, save_examples, tokenize_examples
    from jaxunlearn.train import TrainConfig

    _, assets = built
    examples = load_examples(assets.train_file)
    data = tokenize_examples(
        examples, assets.tokenizer(), max_length=TINY.max_length, buckets=TINY.buckets
    )
    config = TrainConfig(num_steps=3, l2_regularization=0.01)
    provenance = assets.training_provenance(examples, data, config)
    assert provenance.base_model["path"] == str(assets.model_dir)
    assert provenance.data["path"] == str(assets.train_file)
    assert provenance.example_ids == tuple(e.id for e in examples)
    assert provenance.train_config == dataclasses.asdict(config)
    assert provenance.tokenization["buckets"] == list(data.buckets)
    # The examples given must be the file's: another corpus (one example short) is refused.
    copy = dataclasses.replace(assets, corpus_dir=tmp_path / "corpus")
    shutil.copytree(assets.corpus_dir, copy.corpus_dir)
    save_examples(examples[1:], copy.train_file)
    with pytest.raises(RuntimeError, match="does not hold the corpus's training examples"):
        copy.training_provenance(examples, data, config)
