"""Running a script in a fresh interpreter that sees several fake CPU devices.

The device count is fixed when JAX first starts its CPU backend, so a test that needs a mesh
runs its script in a subprocess with `--xla_force_host_platform_device_count`; the script
prints one JSON report as its last line of output.
"""

import json
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def fake_devices_environment(count: int) -> dict[str, str]:
    """This process's environment, with `count` CPU devices and no accelerator, and this
    folder importable (for `device_shares`)."""
    flags = os.environ.get("XLA_FLAGS", "")
    flags = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=path)


def run_report(script: str, *arguments: str, devices: int = 8, timeout: float = 600) -> dict:
    """Runs `script` (a path) on `devices` fake devices and returns its last line as JSON.

    Raises:
        AssertionError: With the end of its standard error, if the script fails.
    """
    result = subprocess.run(
        [sys.executable, script, *arguments],
        env=fake_devices_environment(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def device_shares(state, mesh) -> tuple[float, float]:
    """(the largest share of `state`'s elements that one device holds, the share its
    shardings give it): each array split over the mesh axes of its spec, the rest replicated.
    """
    import jax
    import numpy as np

    leaves = jax.tree.leaves(state)
    total = sum(leaf.size for leaf in leaves)
    held: dict = {}
    expected = 0.0
    for leaf in leaves:
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.size
        axes = [axis for entry in leaf.sharding.spec if entry for axis in np.atleast_1d(entry)]
        expected += leaf.size / np.prod([mesh.shape[axis] for axis in axes])
    return max(held.values()) / total, expected / total


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def run_processes(
    script: str, *arguments: str, processes: int = 2, devices: int = 4, timeout: float = 600
) -> None:
    """Runs `script PROCESS COORDINATOR *arguments` as `processes` processes of `devices` fake
    devices each, joined by `jax.distributed.initialize` at COORDINATOR (JAX's CPU
    collectives), as the hosts of a pod run one program.

    Raises:
        AssertionError: With the end of its standard error, if any process fails.
    """
    coordinator = f"localhost:{free_port()}"
    environment = fake_devices_environment(devices)
    environment["PYTHONPATH"] = os.pathsep.join(
        (os.path.dirname(os.path.abspath(script)), environment["PYTHONPATH"])
    )
    running = [
        subprocess.Popen(
            [sys.executable, script, str(index), coordinator, *arguments],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(processes)
    ]
    failures = []
    for index, process in enumerate(running):
        try:
            _, errors = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in running:
                other.kill()
            raise
        if process.returncode != 0:
            failures.append(f"process {index} exited {process.returncode}:\n{errors[-3000:]}")
    assert not failures, "\n".join(failures)


def run_command_and_report(arguments: list[str], report: str) -> None:
    """Runs `jaxunlearn ARGUMENTS` in this process (one of several joined from the
    environment) and writes its exit status, what it printed and the cluster's size to the
    JSON file `report`."""
    import contextlib
    import io

    import jax

    from jaxunlearn.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(arguments)
    with open(report, "w") as file:
        json.dump(
            {
                "status": status,
                "stdout": stdout.getvalue(),
                "stderr": stderr.getvalue(),
                "processes": jax.process_count(),
                "devices": jax.device_count(),
            },
            file,
        )
