"""The request ledger: round trips, append-only writes, repeats, conflicts, crashes, no text."""

import datetime
import hashlib
import json

import pytest

from jaxunlearn.unlearn import (
    ConflictingRequestError,
    Ledger,
    LedgerEntry,
    LedgerError,
    QueryEdit,
    Removal,
    RequestError,
    ResponseEdit,
    file_sha256,
    resolve_request,
)


def _record(ledger, resolved, **overrides):
    arguments = {
        "method": "llmeraser",
        "settings": {"damping": 0.01, "solver": "cg", "max_steps": 50},
        "adapter": "runs/adapter-1",
    }
    return ledger.record(resolved, **(arguments | overrides))


def test_a_missing_ledger_is_empty(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    assert ledger.entries() == []
    assert ledger.find("0" * 64) is None
    assert not (tmp_path / "ledger.jsonl").exists()


def test_entries_round_trip(tmp_path, examples):
    ledger = Ledger(tmp_path / "nested" / "ledger.jsonl")
    removal = resolve_request(Removal(["secret-id-2", "secret-id-0"]), examples)
    first = _record(
        ledger,
        removal,
        adapter=tmp_path / "adapter",
        adapter_sha256="ab" * 32,
        figures={"residual": 1e-6, "seconds": 2.5},
    )
    edit = resolve_request(QueryEdit({"secret-id-3": "Where does Zelda live?"}), examples)
    second = _record(ledger, edit, method="retrain", settings={"epochs": 3})

    assert isinstance(first, LedgerEntry)
    assert ledger.entries() == [first, second]
    assert first.fingerprint == removal.fingerprint
    assert first.kind == "removal"
    assert first.example_hashes == removal.example_hashes
    assert first.id_hashes == removal.id_hashes
    assert first.num_examples == 2
    assert first.method == "llmeraser"
    assert first.settings == {"damping": 0.01, "solver": "cg", "max_steps": 50}
    assert first.adapter == str(tmp_path / "adapter")
    assert first.adapter_sha256 == "ab" * 32
    assert first.figures == {"residual": 1e-6, "seconds": 2.5}
    assert (first.sequence, second.sequence) == (0, 1)
    assert (second.kind, second.num_examples, second.figures) == ("query_edit", 1, {})
    assert second.adapter_sha256 is None
    created = datetime.datetime.fromisoformat(first.created)
    assert created.utcoffset() == datetime.timedelta(0)
    assert ledger.find(edit.fingerprint) == second
    assert ledger.find("0" * 64) is None


def test_records_are_appended_without_rewriting_earlier_lines(tmp_path, examples):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    _record(ledger, resolve_request(Removal(["secret-id-1"]), examples))
    before = path.read_bytes()
    _record(ledger, resolve_request(ResponseEdit({"secret-id-4": "redacted"}), examples))
    after = path.read_bytes()
    assert after.startswith(before)
    assert after.count(b"\n") == 2
    assert after.endswith(b"\n")


def test_a_repeated_request_is_found_by_check(tmp_path, examples):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    resolved = resolve_request(Removal(["secret-id-1", "secret-id-2"]), examples)
    assert ledger.check(resolved) is None
    entry = _record(ledger, resolved)
    # The same request, its ids in another order, is the same request.
    again = resolve_request(Removal(["secret-id-2", "secret-id-1"]), examples)
    assert ledger.check(again) == entry
    with pytest.raises(RequestError, match="already recorded as entry 0"):
        _record(ledger, again)
    assert len(ledger.entries()) == 1


def test_a_request_touching_a_removed_example_conflicts(tmp_path, examples):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    _record(ledger, resolve_request(Removal(["secret-id-1", "secret-id-2"]), examples))
    overlapping = resolve_request(Removal(["secret-id-2", "secret-id-3"]), examples)
    with pytest.raises(ConflictingRequestError, match=r"already removed .*'secret-id-2'"):
        ledger.check(overlapping)
    with pytest.raises(ConflictingRequestError):
        _record(ledger, overlapping)
    # Matched by id: the example's text does not matter.
    edit = resolve_request(QueryEdit({"secret-id-1": "a new question"}), examples)
    with pytest.raises(ConflictingRequestError, match="'secret-id-1'"):
        ledger.check(edit)
    assert issubclass(ConflictingRequestError, RequestError)
    # Examples no request removed are free to change.
    assert ledger.check(resolve_request(Removal(["secret-id-3"]), examples)) is None


def test_an_edited_example_can_be_removed_and_then_not_edited(tmp_path, examples):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    edit = resolve_request(ResponseEdit({"secret-id-0": "corrected"}), examples)
    _record(ledger, edit)
    removal = resolve_request(Removal(["secret-id-0"]), edit.examples_after)
    assert ledger.check(removal) is None
    _record(ledger, removal)
    with pytest.raises(ConflictingRequestError):
        ledger.check(resolve_request(ResponseEdit({"secret-id-0": "again"}), examples))


def test_a_truncated_last_line_is_ignored_then_replaced(tmp_path, examples):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    first = _record(ledger, resolve_request(Removal(["secret-id-0"]), examples))
    complete = path.read_bytes()
    _record(ledger, resolve_request(Removal(["secret-id-1"]), examples))
    path.write_bytes(path.read_bytes()[: len(complete) + 40])  # A crash mid-append.

    with pytest.warns(RuntimeWarning, match="ignoring line 2"):
        assert ledger.entries() == [first]
    retried = resolve_request(Removal(["secret-id-1"]), examples)
    with pytest.warns(RuntimeWarning, match="ignoring line 2"):
        assert ledger.check(retried) is None
    with pytest.warns(RuntimeWarning, match="removing line 2"):
        second = _record(ledger, retried)
    assert second.sequence == 1
    assert path.read_bytes().startswith(complete)
    assert ledger.entries() == [first, second]


def test_a_garbled_last_line_is_ignored(tmp_path, examples):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    first = _record(ledger, resolve_request(Removal(["secret-id-0"]), examples))
    with path.open("ab") as file:
        file.write(b"\x00\x00\x00\n")
    with pytest.warns(RuntimeWarning, match="ignoring line 2"):
        assert ledger.entries() == [first]


def test_a_corrupt_line_before_the_last_raises(tmp_path, examples):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    _record(ledger, resolve_request(Removal(["secret-id-0"]), examples))
    _record(ledger, resolve_request(Removal(["secret-id-1"]), examples))
    _record(ledger, resolve_request(Removal(["secret-id-2"]), examples))
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:-5]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(LedgerError, match="line 2: not a JSON entry"):
        ledger.entries()
    with pytest.raises(LedgerError, match="line 2"):
        ledger.check(resolve_request(Removal(["secret-id-3"]), examples))
    with pytest.raises(LedgerError, match="line 2"):
        _record(ledger, resolve_request(Removal(["secret-id-3"]), examples))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda row: row.pop("method"), r"missing fields \['method'\]"),
        (lambda row: row.update(num_examples="2"), "field 'num_examples' has the wrong type"),
        (lambda row: row.update(format=2), "ledger format 2"),
    ],
)
def test_an_invalid_entry_before_the_last_raises(tmp_path, examples, change, message):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    _record(ledger, resolve_request(Removal(["secret-id-0"]), examples))
    _record(ledger, resolve_request(Removal(["secret-id-1"]), examples))
    first, second = path.read_text(encoding="utf-8").splitlines()
    row = json.loads(first)
    change(row)
    path.write_text(json.dumps(row) + "\n" + second + "\n", encoding="utf-8")
    with pytest.raises(LedgerError, match=f"line 1: {message}"):
        ledger.entries()


def test_a_deleted_line_breaks_the_sequence(tmp_path, examples):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    for index in range(3):
        _record(ledger, resolve_request(Removal([f"secret-id-{index}"]), examples))
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text(lines[0] + lines[2], encoding="utf-8")
    with pytest.raises(LedgerError, match="line 2: entry has sequence 2, expected 1"):
        ledger.entries()


def test_settings_must_be_json(tmp_path, examples):
    path = tmp_path / "ledger.jsonl"
    resolved = resolve_request(Removal(["secret-id-0"]), examples)
    with pytest.raises(ValueError, match="settings must be JSON-serializable"):
        _record(Ledger(path), resolved, settings={"solver": object()})
    with pytest.raises(ValueError, match="figures must be JSON-serializable"):
        _record(Ledger(path), resolved, figures={"residual": float("nan")})
    with pytest.raises(ValueError, match="string keys"):
        _record(Ledger(path), resolved, settings={1: "x"})
    assert not path.exists()


def test_the_ledger_holds_no_text_and_no_raw_ids(tmp_path, examples):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    new_prompt = "Which street does Yolanda Xylo live on?"
    new_response = "Xylo lives at 12 Nowhere Lane."
    requests = [
        Removal(["secret-id-0", "secret-id-1"]),
        QueryEdit({"secret-id-2": new_prompt}),
        ResponseEdit({"secret-id-3": new_response}),
    ]
    for request in requests:
        _record(ledger, resolve_request(request, examples))
    text = path.read_text(encoding="utf-8")
    assert len(ledger.entries()) == 3
    for example in examples[:4]:
        assert example.id not in text
        assert example.prompt not in text
        assert example.response not in text
        assert example.content_hash not in text
    for fragment in ("secret-id", "Zelda", "zelda", "Yolanda", "Xylo", "Nowhere"):
        assert fragment not in text


def test_file_sha256_of_a_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"some adapter weights")
    assert file_sha256(path) == hashlib.sha256(b"some adapter weights").hexdigest()
    with pytest.raises(FileNotFoundError):
        file_sha256(tmp_path / "missing")


def test_file_sha256_of_a_directory(tmp_path):
    def write_adapter(root, files):
        for relative, contents in files:
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(contents)
        return root

    files = [("config.json", b"{}"), ("tree/weights.bin", b"\x01\x02"), ("a.txt", b"a")]
    digest = file_sha256(write_adapter(tmp_path / "one", files))
    # The same files written in another order give the same digest.
    assert file_sha256(write_adapter(tmp_path / "two", files[::-1])) == digest
    (tmp_path / "two" / "empty").mkdir()
    assert file_sha256(tmp_path / "two") == digest
    renamed = [("config.json", b"{}"), ("tree/weights2.bin", b"\x01\x02"), ("a.txt", b"a")]
    assert file_sha256(write_adapter(tmp_path / "three", renamed)) != digest
    changed = [("config.json", b"{}"), ("tree/weights.bin", b"\x01\x03"), ("a.txt", b"a")]
    assert file_sha256(write_adapter(tmp_path / "four", changed)) != digest
    assert len(digest) == 64
