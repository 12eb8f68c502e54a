"""Examples: ids, the JSONL writer, and loading every supported source through `datasets`."""

import hashlib
import json

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import EXAMPLE_ROWS

from jaxunlearn.data import DataError, Example, content_hash, load_examples, save_examples


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
    with pytest.raises(FileNotFoundError, match="No such data file"):
        load_examples(tmp_path / "absent.jsonl")
    with pytest.raises(FileNotFoundError, match="No such data file or folder"):
        load_examples(tmp_path / "absent.txt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="Cannot read"):
        load_examples(tmp_path / "notes.txt")


def test_saving_rejects_duplicate_ids_and_clashing_metadata(tmp_path):
    with pytest.raises(DataError, match="duplicate example ids 'x'"):
        save_examples([Example("x", "p", "r"), Example("x", "p", "s")], tmp_path / "d.jsonl")
    with pytest.raises(DataError, match=r"metadata keys \['prompt'\]"):
        save_examples([Example("x", "p", "r", {"prompt": "other"})], tmp_path / "c.jsonl")
