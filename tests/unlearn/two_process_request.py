"""One process of `jaxunlearn unlearn --distributed` run as two processes on one mesh.

Run by `test_two_process_request.py` as two processes of 4 fake CPU devices each (JAX's CPU
collectives between them), the way a pod's hosts each run the same command, with the
curvature sample's products recomputed batch by batch: the cluster comes
from the environment variables a launcher sets, and the mesh spans both processes. Each
process writes what the command printed and its exit status to ROOT. With a last argument
`writer-fails`, process 0 meets an error no other process meets.
"""

import os
import pathlib
import sys

PROCESS, COORDINATOR, ROOT = int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
os.environ.update(
    JAX_COORDINATOR_ADDRESS=COORDINATOR, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(PROCESS)
)

from multi_device import run_command_and_report  # noqa: E402

if sys.argv[5:] == ["writer-fails"] and PROCESS == 0:
    # A failure only the writer meets (its storage refuses the ledger), injected.
    import jaxunlearn.unlearn._protocol as protocol

    def refuse(ledger, log=None):
        raise PermissionError(f"injected: cannot write {ledger.path}")

    protocol.recover = refuse

run = ROOT / "run-pair"
arguments = [
    "unlearn", "--model", str(ROOT / "model"), "--adapter", str(run / "adapter"),
    "--data", str(ROOT / "corpus" / "train.jsonl"), "--forget", sys.argv[4],
    "--out", str(run / "unlearned"), "--ledger", str(run / "unlearn-ledger.jsonl"),
    "--mode", "influence", "--max-steps", "12", "--damping", "0.05",
    "--distributed", "--mesh", "fsdp=4,tensor=2", "--json",
    # The curvature sample recomputed per batch, in a loop whose every product is a collective
    # of both processes (the saved linearizations are what the one-process mesh test uses).
    "--linearization-budget-gib", "0",
]  # fmt: skip
run_command_and_report(arguments, ROOT / f"process-{PROCESS}.json")
