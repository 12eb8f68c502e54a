"""One process of `jaxunlearn finetune --distributed` run as two processes on one mesh.

Run by `test_two_process_finetune_cli.py` as two processes of 4 fake CPU devices each (JAX's
CPU collectives between them), each running the same command line as a pod's hosts would, the
cluster read from the environment. Each process writes what the command printed and its exit
status to ROOT.
"""

import os
import pathlib
import sys

PROCESS, COORDINATOR, ROOT = int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
os.environ.update(
    JAX_COORDINATOR_ADDRESS=COORDINATOR, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(PROCESS)
)

from multi_device import run_command_and_report  # noqa: E402
from sharded_request import finetune_arguments  # noqa: E402

arguments = finetune_arguments(ROOT, ROOT / "run-pair")
arguments += ["--distributed", "--mesh", "fsdp=4,tensor=2"]
run_command_and_report(arguments, ROOT / f"process-{PROCESS}.json")
