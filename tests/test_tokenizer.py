"""The byte-level BPE tokenizer of the embedded default."""

import pytest
from transformers import AutoTokenizer

from jaxunlearn.data import train_bpe_tokenizer
from jaxunlearn.errors import SettingsError, UserError

CORPUS = [
    f"The email address of Person {i} is person{i}@example.org. Their phone is 555-01{i:02d}."
    for i in range(200)
]


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_trained_tokenizer_round_trips_any_text_and_loads_with_autotokenizer(tmp_path, hf_home):
    train_bpe_tokenizer(CORPUS, vocab_size=300, out_dir=tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tokenizer) == 300
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = "Zoë Ødegaard, née 李, e-mail zoe+1@exämple.com, ID 123-45-6789 ✓"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Merges learned from the corpus compress it well below one token per byte.
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in CORPUS)
    assert tokens < 0.5 * sum(len(t.encode()) for t in CORPUS)


def test_training_is_deterministic(tmp_path):
    first = train_bpe_tokenizer(CORPUS, vocab_size=300, out_dir=tmp_path / "a")
    second = train_bpe_tokenizer(CORPUS, vocab_size=300, out_dir=tmp_path / "b")
    assert first.get_vocab() == second.get_vocab()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()


def test_too_small_a_vocabulary_is_rejected(tmp_path):
    with pytest.raises(SettingsError, match="vocab_size must be at least 259") as caught:
        train_bpe_tokenizer(CORPUS, vocab_size=100, out_dir=tmp_path / "tok")
    assert isinstance(caught.value, UserError)
