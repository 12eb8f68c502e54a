"""One process of `jaxunlearn unlearn --distributed` run as two processes on one mesh.

Run by `test_two_process_request.py` as two processes of 4 fake CPU devices each (JAX's CPU
collectives between them), the way a pod's hosts each run the same command: the cluster comes
from the environment variables a launcher sets, and the mesh spans both processes. Each
process writes what the command printed on stdout and its exit status to ROOT.
"""

import contextlib
import io
import json
import os
import pathlib
import sys

PROCESS, COORDINATOR, ROOT = int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
os.environ.update(
    JAX_COORDINATOR_ADDRESS=COORDINATOR, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(PROCESS)
)

from jaxunlearn.cli import main  # noqa: E402

run = ROOT / "run-pair"
arguments = [
    "unlearn", "--model", str(ROOT / "model"), "--adapter", str(run / "adapter"),
    "--data", str(ROOT / "corpus" / "train.jsonl"), "--forget", sys.argv[4],
    "--out", str(run / "unlearned"), "--ledger", str(run / "unlearn-ledger.jsonl"),
    "--mode", "influence", "--max-steps", "12", "--damping", "0.05",
    "--distributed", "--mesh", "fsdp=4,tensor=2", "--json",
]  # fmt: skip
stdout = io.StringIO()
with contextlib.redirect_stdout(stdout):
    status = main(arguments)

import jax  # noqa: E402

(ROOT / f"process-{PROCESS}.json").write_text(
    json.dumps(
        {
            "status": status,
            "stdout": stdout.getvalue(),
            "processes": jax.process_count(),
            "devices": jax.device_count(),
        }
    )
)
