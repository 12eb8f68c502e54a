"""The demo on a mesh, for `test_demo.py`: prints its headline figures as one JSON line.

Run in a subprocess with fake CPU devices; the argument is the `--mesh` spec.
"""

import json
import sys
import tempfile

from jaxunlearn.demo import MODELS, run_demo
from jaxunlearn.parallel import Placement, mesh_from_spec

if __name__ == "__main__":
    placement = Placement(mesh_from_spec(sys.argv[1]))
    with tempfile.TemporaryDirectory() as out:
        figures = run_demo(out, progress=False, log=lambda line: None, placement=placement)
    print(json.dumps({name: figures[name] for name in (*MODELS, "data")}))
