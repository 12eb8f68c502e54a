"""The ledger (format 2): round trips, append-only writes, keys, seals, crashes, the lock."""

import datetime
import fcntl
import hashlib
import json
import multiprocessing
import stat
import warnings

import pytest

from jaxunlearn.errors import UserError
from jaxunlearn.unlearn import (
    ConflictingRequestError,
    Ledger,
    LedgerError,
    Record,
    RequestError,
    file_sha256,
)


def _ledger_with(path, count):
    """A ledger at `path` holding `count` intent records (numbered by an `n` field)."""
    ledger = Ledger(path)
    for n in range(count):
        ledger.append("intent", n=n, parent_digest=f"{n:064x}")
    return ledger


def _lines(path):
    return path.read_bytes().decode("utf-8").splitlines(keepends=True)


def _canonical(row):
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_a_missing_ledger_has_no_records_and_reading_creates_nothing(tmp_path):
    ledger = Ledger(tmp_path / "nested" / "ledger.jsonl")
    assert not ledger.exists()
    assert ledger.records() == []
    assert ledger.id is None
    assert list(tmp_path.iterdir()) == []


def test_records_round_trip(tmp_path, no_warnings):
    path = tmp_path / "nested" / "ledger.jsonl"
    ledger = Ledger(path)
    written = [
        ledger.append("root", adapter_digest="ab" * 32, adapter=str(tmp_path / "adapter")),
        ledger.append(
            "intent",
            parent_digest="ab" * 32,
            id_hashes=["01" * 32, "02" * 32],
            settings={"damping": 0.01, "solver": "cg", "max_steps": 50, "name": "Zoë"},
            staged=None,
        ),
        ledger.append("commit", intent=1, figures={"residual": 1e-6, "seconds": 2.5}),
        ledger.append("rollback", intent=1, reason="interrupted"),
    ]
    assert all(isinstance(record, Record) for record in written)
    assert [record.sequence for record in written] == [0, 1, 2, 3]
    assert [record.type for record in written] == ["root", "intent", "commit", "rollback"]
    assert written[1].fields == {
        "parent_digest": "ab" * 32,
        "id_hashes": ["01" * 32, "02" * 32],
        "settings": {"damping": 0.01, "solver": "cg", "max_steps": 50, "name": "Zoë"},
        "staged": None,
    }
    assert written[2]["figures"] == {"residual": 1e-6, "seconds": 2.5}
    assert written[3].get("reason") == "interrupted"
    assert written[3].get("missing", "default") == "default"
    for record in written:
        assert not {"sequence", "type", "created", "mac", "format"} & set(record.fields)
        created = datetime.datetime.fromisoformat(record.created)
        assert created.utcoffset() == datetime.timedelta(0)
        assert created.microsecond == 0
        now = datetime.datetime.now(datetime.UTC)
        assert abs(now - created) < datetime.timedelta(minutes=5)
    # The same records read back, by this instance and by a fresh one.
    assert ledger.records() == written
    assert Ledger(path).records() == written
    ledger_id = ledger.id
    assert isinstance(ledger_id, str)
    assert len(ledger_id) == 32
    assert Ledger(path).id == ledger_id


def test_appends_never_rewrite_earlier_bytes(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    before = b""
    for n in range(4):
        ledger.append("intent", n=n)
        after = path.read_bytes()
        assert after.startswith(before)
        assert len(after) > len(before)
        assert after.endswith(b"\n")
        assert after.count(b"\n") == n + 2  # The header and n + 1 records.
        before = after


def test_the_key_file_is_private_and_reused(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = _ledger_with(path, 1)
    key_path = tmp_path / "ledger.jsonl.key"
    assert ledger.key_path == str(key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = key_path.read_text(encoding="ascii")
    assert len(bytes.fromhex(key.strip())) >= 16
    digest = ledger.keyed("secret-id-0", purpose="id")

    reopened = Ledger(path)
    reopened.append("commit", intent=0)
    reopened.ensure_exists()
    assert key_path.read_text(encoding="ascii") == key
    assert reopened.keyed("secret-id-0", purpose="id") == digest
    assert len(reopened.records()) == 2


def test_keyed_is_an_hmac_per_key_and_purpose(tmp_path):
    one = Ledger(tmp_path / "one.jsonl")
    two = Ledger(tmp_path / "two.jsonl")
    digest = one.keyed("secret-id-0", purpose="id")
    assert len(digest) == 64
    assert set(digest) <= set("0123456789abcdef")
    assert one.keyed("secret-id-0", purpose="id") == digest
    assert one.keyed("secret-id-1", purpose="id") != digest
    assert one.keyed("secret-id-0", purpose="fingerprint") != digest
    assert two.keyed("secret-id-0", purpose="id") != digest
    for plain in ("secret-id-0", json.dumps(["id", "secret-id-0"])):
        assert digest != hashlib.sha256(plain.encode()).hexdigest()
    # The key made by `keyed` before the ledger exists is the ledger's key.
    one.append("root", adapter_digest=digest)
    assert Ledger(tmp_path / "one.jsonl").keyed("secret-id-0", purpose="id") == digest
    assert Ledger(tmp_path / "one.jsonl").records()[0]["adapter_digest"] == digest


def test_a_truncated_last_line_is_ignored_then_replaced(tmp_path, no_warnings):
    path = tmp_path / "ledger.jsonl"
    ledger = _ledger_with(path, 2)
    complete = path.read_bytes()
    first_two = ledger.records()
    ledger.append("commit", intent=1, figures={"seconds": 2.5})
    path.write_bytes(path.read_bytes()[: len(complete) + 30])  # A crash mid-append.

    with pytest.warns(RuntimeWarning, match="ignoring line 4"):
        assert Ledger(path).records() == first_two
    with pytest.warns(RuntimeWarning, match="removing line 4"):
        retried = Ledger(path).append("commit", intent=1, figures={"seconds": 3.0})
    assert retried.sequence == 2
    after = path.read_bytes()
    assert after.startswith(complete)
    assert after.count(b"\n") == 4
    assert Ledger(path).records() == [*first_two, retried]


@pytest.mark.parametrize("garbage", [b"\x00\x00\x00\n", b'{"sequence": 1, "type": "commit"\n'])
def test_a_garbled_last_line_is_ignored_then_replaced(tmp_path, no_warnings, garbage):
    path = tmp_path / "ledger.jsonl"
    ledger = _ledger_with(path, 1)
    complete = path.read_bytes()
    first = ledger.records()
    with path.open("ab") as file:
        file.write(garbage)

    with pytest.warns(RuntimeWarning, match="ignoring line 3"):
        assert Ledger(path).records() == first
    with pytest.warns(RuntimeWarning, match="removing line 3"):
        second = Ledger(path).append("commit", intent=0)
    assert second.sequence == 1
    after = path.read_bytes()
    assert after.startswith(complete)
    assert garbage not in after
    assert after.count(b"\n") == 3
    assert Ledger(path).records() == [*first, second]


def test_a_corrupt_line_before_the_last_raises(tmp_path):
    path = tmp_path / "ledger.jsonl"
    _ledger_with(path, 3)
    lines = _lines(path)
    lines[2] = lines[2][:-6] + "\n"  # The second record, cut short.
    path.write_text("".join(lines), encoding="utf-8")
    damaged = path.read_bytes()
    with pytest.raises(LedgerError, match="line 3: not a JSON record"):
        Ledger(path).records()
    with pytest.raises(LedgerError, match="line 3"):
        Ledger(path).append("commit", intent=0)
    assert path.read_bytes() == damaged


@pytest.mark.parametrize(
    ("line", "change"),
    [
        (0, lambda row: row.update(ledger_id="0" * 32)),
        (1, lambda row: row.update(n=7)),
        (2, lambda row: row.update(parent_digest="f" * 64)),
        (2, lambda row: row.update(sequence=5)),
        (2, lambda row: row.update(extra="added")),
    ],
)
def test_an_edited_earlier_line_breaks_its_seal(tmp_path, line, change):
    path = tmp_path / "ledger.jsonl"
    _ledger_with(path, 3)
    lines = _lines(path)
    row = json.loads(lines[line])
    change(row)
    lines[line] = _canonical(row)
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(LedgerError, match=f"line {line + 1}: its seal does not match"):
        Ledger(path).records()
    with pytest.raises(LedgerError, match=f"line {line + 1}"):
        Ledger(path).append("commit", intent=0)


def test_a_deleted_line_is_detected(tmp_path):
    path = tmp_path / "ledger.jsonl"
    _ledger_with(path, 3)
    lines = _lines(path)
    del lines[1]  # The first record.
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(LedgerError, match="line 2: its seal does not match"):
        Ledger(path).records()


def test_a_deleted_header_is_detected(tmp_path):
    path = tmp_path / "ledger.jsonl"
    _ledger_with(path, 2)
    path.write_text("".join(_lines(path)[1:]), encoding="utf-8")
    with pytest.raises(LedgerError):
        Ledger(path).records()


def test_swapped_lines_are_detected(tmp_path):
    path = tmp_path / "ledger.jsonl"
    _ledger_with(path, 4)
    lines = _lines(path)
    lines[2], lines[3] = lines[3], lines[2]
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(LedgerError, match="line 3: its seal does not match"):
        Ledger(path).records()


def test_a_missing_key_raises_and_is_not_replaced(tmp_path):
    path = tmp_path / "ledger.jsonl"
    _ledger_with(path, 1)
    key_path = tmp_path / "ledger.jsonl.key"
    key_path.unlink()
    contents = path.read_bytes()
    with pytest.raises(LedgerError, match=r"\.key is missing"):
        Ledger(path).records()
    with pytest.raises(LedgerError, match=r"\.key is missing"):
        Ledger(path).append("commit", intent=0)
    with pytest.raises(LedgerError, match=r"\.key is missing"):
        Ledger(path).keyed("secret-id-0", purpose="id")
    with pytest.raises(LedgerError, match=r"\.key is missing"):
        Ledger(path).ensure_exists()
    assert not key_path.exists()
    assert path.read_bytes() == contents


def test_another_ledgers_key_raises(tmp_path):
    path = tmp_path / "one.jsonl"
    _ledger_with(path, 1)
    _ledger_with(tmp_path / "two.jsonl", 1)
    key_path = tmp_path / "one.jsonl.key"
    key_path.write_bytes((tmp_path / "two.jsonl.key").read_bytes())
    contents = path.read_bytes()
    with pytest.raises(LedgerError, match="key"):
        Ledger(path).records()
    with pytest.raises(LedgerError, match="key"):
        Ledger(path).append("commit", intent=0)
    assert path.read_bytes() == contents


@pytest.mark.parametrize("key_text", ["not hex\n", "abcd\n", ""])
def test_a_key_file_without_a_key_raises(tmp_path, key_text):
    path = tmp_path / "ledger.jsonl"
    _ledger_with(path, 1)
    (tmp_path / "ledger.jsonl.key").write_text(key_text, encoding="ascii")
    with pytest.raises(LedgerError, match="key"):
        Ledger(path).records()


def test_a_format_1_ledger_is_refused(tmp_path):
    path = tmp_path / "ledger.jsonl"
    row = {
        "format": 1,
        "sequence": 0,
        "created": "2024-01-01T00:00:00+00:00",
        "fingerprint": "ab" * 32,
        "kind": "removal",
        "method": "llmeraser",
    }
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    contents = path.read_bytes()
    with pytest.raises(LedgerError, match="format 1"):
        Ledger(path).records()
    with pytest.raises(LedgerError, match="format 1"):
        Ledger(path).append("root", adapter_digest="ab" * 32)
    assert path.read_bytes() == contents


@pytest.mark.parametrize(
    "fields",
    [
        {"settings": {"solver": object()}},
        {"figures": {"residual": float("nan")}},
        {"figures": {"residual": float("inf")}},
        {"value": float("-inf")},
        {"blob": b"bytes"},
        {"settings": {1: "x", "y": 2}},
    ],
)
def test_fields_must_be_json_with_finite_numbers(tmp_path, fields):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    with pytest.raises(ValueError, match="JSON-serializable with finite numbers"):
        ledger.append("commit", **fields)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["sequence", "type", "created", "mac", "format"])
def test_fields_may_not_use_reserved_names(tmp_path, name):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    with pytest.raises(ValueError, match=f"may not be named \\['{name}'\\]"):
        ledger.append("commit", intent=0, **{name: 1})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("record_type", ["header", "entry", "", "ROOT"])
def test_record_types_are_checked(tmp_path, record_type):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    with pytest.raises(ValueError, match="record type must be one of"):
        ledger.append(record_type, intent=0)
    assert list(tmp_path.iterdir()) == []


def _append_many(path, writer, barrier, count):
    ledger = Ledger(path)
    barrier.wait(timeout=60)
    for n in range(count):
        ledger.append("intent", writer=writer, n=n)


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_concurrent_appends_from_two_processes_form_one_chain(tmp_path):
    path = tmp_path / "ledger.jsonl"
    # Forked, so the children need not import jax again.
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    processes = [
        context.Process(target=_append_many, args=(str(path), writer, barrier, 50))
        for writer in ("a", "b")
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        if process.is_alive():
            process.terminate()
            process.join()
    assert [process.exitcode for process in processes] == [0, 0]

    assert path.read_bytes().count(b"\n") == 101
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = Ledger(path).records()  # Verifies every seal of the chain.
    assert [record.sequence for record in records] == list(range(100))
    for writer in ("a", "b"):
        assert [r["n"] for r in records if r["writer"] == writer] == list(range(50))
    assert sum(json.loads(line).get("type") == "header" for line in _lines(path)) == 1


def test_the_lock_is_exclusive_and_re_entrant(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    with ledger.lock() as held:
        assert held is ledger
        with open(tmp_path / "ledger.jsonl.lock", "a+b") as other:
            # Another open file description (as another process has) cannot take it.
            with pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            with ledger.lock():
                ledger.append("root", adapter_digest="ab" * 32)  # Takes the lock again.
            with pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "ledger.jsonl.lock", "a+b") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other.fileno(), fcntl.LOCK_UN)
    assert [record.type for record in ledger.records()] == ["root"]


def test_ensure_exists_is_idempotent(tmp_path, no_warnings):
    path = tmp_path / "nested" / "ledger.jsonl"
    ledger = Ledger(path)
    ledger_id = ledger.ensure_exists()
    assert isinstance(ledger_id, str)
    assert len(ledger_id) == 32
    header = path.read_bytes()
    assert header.count(b"\n") == 1
    assert json.loads(header)["type"] == "header"
    assert Ledger(path).ensure_exists() == ledger_id
    assert ledger.ensure_exists() == ledger_id
    assert path.read_bytes() == header
    assert ledger.id == ledger_id
    assert ledger.records() == []

    ledger.append("root", adapter_digest="ab" * 32)
    assert path.read_bytes().startswith(header)
    assert Ledger(path).ensure_exists() == ledger_id
    assert Ledger(path).id == ledger_id
    # A ledger created by its first append has a header too.
    other = _ledger_with(tmp_path / "other.jsonl", 1)
    assert other.ensure_exists() == other.id != ledger_id


def test_error_classes():
    assert issubclass(LedgerError, UserError)
    assert issubclass(LedgerError, ValueError)
    assert issubclass(ConflictingRequestError, RequestError)


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


def test_an_edited_last_line_is_tampering_not_a_torn_write(tmp_path):
    # A well-formed line whose seal fails is never excused as crash damage, last or not:
    # otherwise editing the newest record would only warn, and the next append would erase it.
    path = tmp_path / "ledger.jsonl"
    _ledger_with(path, 3)
    lines = _lines(path)
    row = json.loads(lines[-1])
    row["type"] = "rollback"
    lines[-1] = _canonical(row)
    path.write_text("".join(lines))
    with pytest.raises(LedgerError, match="seal"):
        Ledger(path).records()
    # Removing the second-to-last line breaks the last line's chained seal the same way.
    _ledger_with(tmp_path / "b.jsonl", 3)
    lines = _lines(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").write_text("".join([*lines[:-2], lines[-1]]))
    with pytest.raises(LedgerError):
        Ledger(tmp_path / "b.jsonl").records()


def test_a_ledger_cut_short_while_being_created_is_rewritten(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.ensure_exists()
    header = path.read_bytes()
    path.write_bytes(header[: len(header) // 2])  # a crash half-way through the header
    reopened = Ledger(path)
    assert reopened.records() == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        reopened.append("root", adapter="a", adapter_digest="0" * 64)
    assert [record.type for record in Ledger(path).records()] == ["root"]


def test_a_reader_reads_what_the_writer_wrote_and_writes_nothing(tmp_path):
    # The view every process but the writer has of a ledger in a multi-process request.
    path = tmp_path / "ledger.jsonl"
    writer = _ledger_with(path, 2)
    reader = writer.reader()
    assert reader.read_only
    assert not writer.read_only
    assert reader.records() == writer.records()
    assert reader.keyed("z1", purpose="id") == writer.keyed("z1", purpose="id")
    before = path.read_bytes()
    with writer.lock(), reader.lock():  # the writer's lock does not block a reader
        with pytest.raises(RuntimeError, match="read-only"):
            reader.append("intent", n=2)
        with pytest.raises(RuntimeError, match="read-only"):
            reader.ensure_exists()
    assert path.read_bytes() == before


def test_a_reader_of_a_ledger_not_yet_created_never_creates_its_key(tmp_path):
    reader = Ledger(tmp_path / "ledger.jsonl").reader()
    assert reader.records() == []
    with pytest.raises(LedgerError, match="missing"):
        reader.keyed("z1", purpose="id")
    assert sorted(tmp_path.iterdir()) == []
