"""One process of a two-process fine-tune on a mesh spanning both; writes its LoRA as NumPy.

Run by `test_sharded_training.py` as two processes of 4 fake CPU devices each (JAX's CPU
collectives between them), the way a pod's hosts run one program: every process calls the
same functions, each holding its devices' blocks only.
"""

import sys

import jax

PROCESS, COORDINATOR, OUT = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(COORDINATOR, num_processes=2, process_id=PROCESS)

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from sharded_finetune import CONFIG  # noqa: E402
from training_fixtures import FakeDataset, tiny_lora_model  # noqa: E402

from jaxunlearn import parallel  # noqa: E402
from jaxunlearn.parallel import host_array  # noqa: E402
from jaxunlearn.train import finetune  # noqa: E402
from jaxunlearn.unlearn import tree_digest  # noqa: E402

assert jax.process_count() == 2, jax.process_count()
assert jax.device_count() == 8, jax.devices()
mesh = parallel.make_mesh(fsdp=4, tensor=2)
model = tiny_lora_model(dropout=0.1)
result = finetune(
    model,
    FakeDataset(32, seed=1),
    config=CONFIG,
    eval_data=FakeDataset(8, seed=2),
    progress=False,
    mesh=mesh,
)
lora = nnx.state(model, nnx.LoRAParam)
leaves = jax.tree.leaves(lora)
assert not all(leaf.is_fully_addressable for leaf in leaves)
digest = tree_digest(lora)  # every process takes part in the gather
if PROCESS == 0:
    np.savez(
        OUT,
        *[host_array(leaf) for leaf in leaves],
        losses=np.asarray(result.history.losses),
        digest=np.asarray(digest),
    )
else:
    for leaf in leaves:
        host_array(leaf)
