"""Who writes and where processes wait, in a program of one process (the multi-process runs
are in the two-process tests of training and unlearning)."""

import os
import subprocess
import sys

import pytest

from jaxunlearn import processes
from jaxunlearn.errors import UserError


def test_one_process_is_the_writer_and_never_waits():
    assert processes.is_writer()
    processes.sync("nothing to wait for")


def test_a_step_of_one_process_is_its_block():
    done = []
    with processes.step("work"):
        done.append(1)
    assert done == [1]
    # Its own error, unchanged: there is no other process to tell.
    with pytest.raises(PermissionError, match="refused"), processes.step("work"):
        raise PermissionError("refused")


def test_shared_random_names_are_fresh_hex():
    names = {processes.shared_random_hex(6) for _ in range(8)}
    assert len(names) == 8
    assert all(len(name) == 12 and int(name, 16) >= 0 for name in names)


def test_a_malformed_cluster_environment_is_a_user_error(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(UserError, match="JAX_NUM_PROCESSES must be an integer, got 'two'"):
        processes.initialize()


def test_distributed_without_a_cluster_is_one_line_and_exit_2(tmp_path):
    # A fresh interpreter: joining a cluster must come before JAX starts a backend.
    environment = {name: value for name, value in os.environ.items() if not name.startswith("JAX_")}
    result = subprocess.run(
        [
            sys.executable, "-m", "jaxunlearn.cli", "unlearn", "--model", "m", "--adapter", "a",
            "--data", "d", "--forget", "x", "--out", os.fspath(tmp_path / "o"), "--distributed",
        ],
        env={**environment, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "Cannot join the other processes" in lines[0]
    assert "JAX_COORDINATOR_ADDRESS" in lines[0]
    assert result.stdout == ""
