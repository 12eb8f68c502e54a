"""`jaxunlearn simulate-deletions`: the table, the JSON, the files, and one-line user errors."""

import json
import math
from fractions import Fraction

import pytest

from jaxunlearn.cli import main

TRIALS = "2000"


def harmonic(k):
    return float(sum(Fraction(1, i) for i in range(1, k + 1)))


def strict_loads(text):
    def refuse(constant):
        raise AssertionError(f"{constant} in strict JSON")

    return json.loads(text, parse_constant=refuse)


def table_rows(text):
    """{(method, budget): (mean, stderr, exact)} from the Markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in ("S3T", "SISA"):
            mean, error = (float(part) for part in cells[2].split("±"))
            rows[cells[0], cells[1]] = (mean, error, float(cells[3]))
    return rows


def test_the_table_gives_each_budget_and_sisa_beside_the_closed_forms(capsys):
    arguments = ["simulate-deletions", "--shards", "5", "--slices", "6", "--budget", "1"]
    arguments += ["--budget", "3", "--sisa", "--trials", TRIALS, "--seed", "4"]
    assert main(arguments) == 0
    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == {("S3T", "1"), ("S3T", "3"), ("SISA", "-")}
    for key, closed_form in [
        (("S3T", "1"), 30 * harmonic(5)),
        (("S3T", "3"), 30 * harmonic(15)),
        (("SISA", "-"), 5 * harmonic(5)),
    ]:
        mean, error, exact = rows[key]
        assert exact == pytest.approx(closed_form, abs=0.006)
        assert abs(mean - closed_form) <= 4 * error + 0.01
        assert abs(mean - closed_form) <= 0.05 * closed_form


def test_json_is_alone_on_stdout_and_the_files_are_written(tmp_path, capsys):
    out = tmp_path / "rate"
    arguments = ["simulate-deletions", "--slices", "4", "--shards", "3", "--budget", "2"]
    arguments += ["--budget", "4", "--sisa", "--trials", TRIALS, "--out", str(out), "--json"]
    assert main(arguments) == 0
    printed = strict_loads(capsys.readouterr().out)  # the whole of stdout parses
    written = strict_loads((out / "deletion-rate.json").read_text())
    assert printed == written
    assert (printed["num_shards"], printed["num_slices"]) == (3, 4)
    assert [(row["method"], row["budget"]) for row in printed["rows"]] == [
        ("S3T", 2),
        ("S3T", 4),
        ("SISA", None),
    ]
    for row in printed["rows"]:
        assert math.isfinite(row["mean"])
        assert row["standard_error"] > 0
    assert printed["rows"][0]["orders"] == [[0, 1, 2, 3], [3, 0, 1, 2]]
    assert printed["rows"][0]["exact"] == pytest.approx(12 * harmonic(6))
    assert (out / "deletion-rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_prior_file_and_prior_aware_selection(tmp_path, capsys):
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps([32, 16, 8, 4, 2, 1]))
    common = ["simulate-deletions", "--budget", "1", "--trials", TRIALS, "--json"]
    assert main([*common, "--prior", str(prior), "--selection", "prior-aware"]) == 0
    aware = strict_loads(capsys.readouterr().out)["rows"][0]
    assert main([*common, "--prior", "32,16,8,4,2,1"]) == 0
    cyclic = strict_loads(capsys.readouterr().out)["rows"][0]
    # Slice 5 is the least likely to be deleted; cyclic order 0 starts with slice 0, the most.
    assert aware["orders"][0][0] == 5
    assert cyclic["orders"][0][0] == 0
    assert aware["mean"] > 10 * cyclic["mean"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--budget", "7"],
        ["--budget", "0"],
        ["--prior", "1,x,2"],
        ["--prior", "1,-1,1,1,1,1"],
        ["--prior", "1,1,1"],
        ["--trials", "1"],
        ["--shards", "0"],
        ["--seed", "-1"],
        ["--prior", "missing-prior.json"],
    ],
)
def test_a_bad_argument_is_one_line_and_status_2(extra, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate-deletions", "--trials", "50", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("jaxunlearn simulate-deletions: error: ")
