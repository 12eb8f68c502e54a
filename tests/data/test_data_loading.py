"""Examples: ids, the JSONL writer, and loading every supported source through `datasets`."""

import hashlib
import json
import time

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import EXAMPLE_ROWS

from jaxunlearn.data import (
    DataError,
    DataNotFoundError,
    Example,
    content_hash,
    load_examples,
    save_examples,
)
from jaxunlearn.errors import UserError


def _expected_examples(rows=EXAMPLE_ROWS):
    return [Example(r["id"], r["prompt"], r["response"], {"topic": r["topic"]}) for r in rows]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _write_source(tmp_path, kind, rows=EXAMPLE_ROWS):
    """Writes `rows` in one of the supported forms and returns what to pass to load_examples."""
    if kind == "jsonl":
        return _write_jsonl(tmp_path / "data.jsonl", rows)
    if kind == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
        return path
    if kind == "csv":
        path = tmp_path / "data.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
        return path
    if kind == "parquet":
        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if kind == "saved_dataset":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
        return path
    if kind == "data_folder":
        folder = tmp_path / "folder"
        folder.mkdir()
        _write_jsonl(folder / "train.jsonl", rows)
        return folder
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["jsonl", "json", "csv", "parquet", "saved_dataset", "data_folder"]
)
def test_every_source_kind_gives_the_same_examples(tmp_path, kind):
    assert load_examples(_write_source(tmp_path, kind)) == _expected_examples()


def test_split_of_a_saved_dataset_dict(tmp_path):
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_list(EXAMPLE_ROWS[:2]),
        test=datasets.Dataset.from_list(EXAMPLE_ROWS[2:]),
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_examples(tmp_path / "dict", split="test") == _expected_examples(EXAMPLE_ROWS[2:])
    with pytest.raises(DataError, match=r"no split 'validation'.*\['test', 'train'\]"):
        load_examples(tmp_path / "dict", split="validation")


def test_save_then_load_round_trips_and_bytes_are_deterministic(tmp_path):
    examples = [
        Example("a", "Prompt é", " response ✓", {"person_id": "p1", "kind": "qa", "field": None}),
        Example("b", "", "only a response", {"person_id": "p2", "kind": "bio", "field": "x"}),
    ]
    assert save_examples(examples, tmp_path / "one.jsonl") == 2
    save_examples(examples, tmp_path / "two.jsonl")
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    assert load_examples(tmp_path / "one.jsonl") == examples


def test_content_hash_ids_without_an_id_column(tmp_path):
    rows = [{"prompt": "ab", "response": "c"}, {"prompt": "a", "response": "bc"}]
    examples = load_examples(_write_jsonl(tmp_path / "no_ids.jsonl", rows))
    # Recomputed here from the documented definition, not through the library.
    canonical = json.dumps(rows[0], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert examples[0].id == "h-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert examples[1].id == content_hash("a", "bc") != examples[0].id
    # The hash ignores metadata and the process: reloading gives the same ids.
    assert [e.id for e in load_examples(tmp_path / "no_ids.jsonl")] == [e.id for e in examples]


def test_id_column_is_configurable_and_integer_ids_become_strings(tmp_path):
    rows = [{"uid": 7, "question": "Q?", "answer": " A.", "id": "not-the-id"}]
    path = _write_jsonl(tmp_path / "renamed.jsonl", rows)
    (example,) = load_examples(
        path, prompt_column="question", response_column="answer", id_column="uid"
    )
    assert example == Example("7", "Q?", " A.", {"id": "not-the-id"})
    (hashed,) = load_examples(
        path, prompt_column="question", response_column="answer", id_column=None
    )
    assert hashed.id == content_hash("Q?", " A.")


def test_csv_cells_stay_text(tmp_path):
    path = tmp_path / "numbers.csv"
    path.write_text('id,prompt,response\n1,,042\n2,NA,"x, y"\n', encoding="utf-8")
    assert load_examples(path) == [Example("1", "", "042"), Example("2", "NA", "x, y")]


def test_missing_column_is_named(tmp_path):
    path = _write_jsonl(tmp_path / "no_response.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(DataError, match=r"no column 'response'.*\['prompt', 'answer'\]"):
        load_examples(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n  \n"),
        ("empty.json", "[]"),
        ("empty.csv", ""),
        ("header_only.csv", "prompt,response\n"),
    ],
)
def test_empty_text_files_are_reported(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        load_examples(path)


def test_empty_parquet_file_is_reported(tmp_path):
    path = tmp_path / "empty.parquet"
    schema = pa.schema([("prompt", pa.string()), ("response", pa.string())])
    pq.write_table(schema.empty_table(), path)
    with pytest.raises(DataError, match="is empty"):
        load_examples(path)


def test_duplicate_ids_are_named(tmp_path):
    rows = [{"id": i, "prompt": "p", "response": f"r{n}"} for n, i in enumerate("abab")]
    with pytest.raises(DataError, match="duplicate example ids 'a', 'b'"):
        load_examples(_write_jsonl(tmp_path / "dups.jsonl", rows))


def test_identical_examples_without_ids_are_duplicates(tmp_path):
    rows = [{"prompt": "p", "response": "r"}] * 2
    with pytest.raises(DataError, match=f"duplicate example ids '{content_hash('p', 'r')}'"):
        load_examples(_write_jsonl(tmp_path / "same.jsonl", rows))


def test_missing_and_empty_values_name_the_row(tmp_path):
    null_prompt = [{"prompt": "p", "response": "r"}, {"prompt": None, "response": "r2"}]
    with pytest.raises(DataError, match="row 1: column 'prompt' has no value"):
        load_examples(_write_jsonl(tmp_path / "null.jsonl", null_prompt))
    empty_response = [{"prompt": "p", "response": ""}]
    with pytest.raises(DataError, match="row 0: the response is empty"):
        load_examples(_write_jsonl(tmp_path / "empty_response.jsonl", empty_response))
    numeric = [{"prompt": "p", "response": 5}]
    with pytest.raises(DataError, match="column 'response' must hold text, got int"):
        load_examples(_write_jsonl(tmp_path / "numeric.jsonl", numeric))


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataNotFoundError, match="No such data file"):
        load_examples(tmp_path / "absent.jsonl")
    # Also a FileNotFoundError, which callers caught before DataNotFoundError existed.
    with pytest.raises(FileNotFoundError, match="No such data file or folder"):
        load_examples(tmp_path / "absent.txt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"Cannot read.*'\.txt'.*\.jsonl, \.json, \.csv, \.parquet"):
        load_examples(tmp_path / "notes.txt")
    (tmp_path / "train").write_text('{"prompt": "p", "response": "r"}\n')
    with pytest.raises(DataError, match=r"without a suffix.*\.jsonl, \.json, \.csv, \.parquet"):
        load_examples(tmp_path / "train")


@pytest.fixture
def no_hub(monkeypatch):
    """Fails the test if anything reaches `datasets.load_dataset` (a Hub lookup, at worst)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"datasets.load_dataset was called with {args} {kwargs}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


@pytest.mark.parametrize(
    "source",
    [
        "corpus/train",  # an owner/name whose owner is a local folder
        "corpus/sub/train",
        "./train",
        "~/no-such-jaxunlearn-folder/train",
        "train.txt",
        "no such data",
        "corpus\\train",
    ],
)
def test_a_missing_local_path_fails_at_once_without_a_hub_lookup(
    tmp_path, monkeypatch, no_hub, source
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    started = time.perf_counter()
    with pytest.raises(DataNotFoundError, match="No such data file or folder") as caught:
        load_examples(source)
    assert time.perf_counter() - started < 0.5
    assert isinstance(caught.value, UserError)


def test_an_absolute_missing_path_fails_at_once_without_a_hub_lookup(tmp_path, no_hub):
    for source in (tmp_path / "train", tmp_path / "missing" / "train.jsonl"):
        with pytest.raises(DataNotFoundError, match="No such data file or folder"):
            load_examples(source)


def test_only_a_hub_name_that_is_not_local_is_looked_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_load_dataset(path, **kwargs):  # stands in for the Hub: no network in tests
        calls.append(path)
        return datasets.Dataset.from_dict({"prompt": ["p"], "response": ["r"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for name in ("someone/pii-corpus", "pii_corpus"):
        assert [e.response for e in load_examples(name)] == ["r"]
    assert calls == ["someone/pii-corpus", "pii_corpus"]


def test_a_hub_lookup_that_fails_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def unreachable(path, **kwargs):
        raise ConnectionError(f"Couldn't reach {path!r} on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataNotFoundError, match=r"No data file or folder.*Couldn't reach"):
        load_examples("someone/pii-corpus")


def test_text_that_is_not_utf8_is_a_data_error_naming_the_file(tmp_path, no_hub):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(
        b'{"prompt": "a", "response": "b"}\n{"prompt": "The caf\xe9", "response": "is open"}\n'
    )
    with pytest.raises(DataError, match=r"'.*latin1\.jsonl' is not UTF-8.*0xe9 at line 2"):
        load_examples(latin1)
    spreadsheet = tmp_path / "export.csv"
    spreadsheet.write_bytes("prompt,response\nSe\u00f1or,Jos\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"'.*export\.csv' is not UTF-8.*line 2"):
        load_examples(spreadsheet)
    # A multi-byte character cut off at the end of the file.
    truncated = tmp_path / "truncated.json"
    truncated.write_bytes('[{"prompt": "p", "response": "\u00e9'.encode()[:-1])
    with pytest.raises(DataError, match=r"truncated\.json' is not UTF-8"):
        load_examples(truncated)


def test_utf8_errors_past_the_first_chunk_name_the_right_line(tmp_path, monkeypatch):
    import jaxunlearn.data._loading as loading

    monkeypatch.setattr(loading, "_UTF8_CHUNK_BYTES", 7)  # every character straddles chunks
    path = tmp_path / "long.jsonl"
    good = '{"prompt": "caf\u00e9", "response": "\u00fcber"}\n' * 3
    path.write_bytes(good.encode() + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=f"0xff at line 4 \\(byte offset {len(good.encode()) + 12}"):
        load_examples(path)


def test_files_that_do_not_parse_are_data_errors_naming_the_file(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p", "response": "r"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl' cannot be read as JSON Lines"):
        load_examples(broken)
    quote = tmp_path / "quote.csv"
    quote.write_text('prompt,response\n"p,r\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"quote\.csv' cannot be read as CSV"):
        load_examples(quote)


def test_saving_rejects_duplicate_ids_and_clashing_metadata(tmp_path):
    with pytest.raises(DataError, match="duplicate example ids 'x'"):
        save_examples([Example("x", "p", "r"), Example("x", "p", "s")], tmp_path / "d.jsonl")
    with pytest.raises(DataError, match=r"metadata keys \['prompt'\]"):
        save_examples([Example("x", "p", "r", {"prompt": "other"})], tmp_path / "c.jsonl")


def test_loading_a_file_leaves_no_cached_copy_of_its_text(tmp_path, monkeypatch):
    # A cached Arrow copy would still hold an example after the user deleted it from the file.
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_home / "datasets")
    path = tmp_path / "secret.jsonl"
    secret = "the unmistakable secret response 7f3a"
    path.write_text(json.dumps({"id": "a", "prompt": "p", "response": secret}) + "\n")
    (example,) = load_examples(path)
    assert example.response == secret
    leftovers = [f for f in tmp_path.rglob("*") if f.is_file() and f != path]
    assert not [f for f in leftovers if secret.encode() in f.read_bytes()]
