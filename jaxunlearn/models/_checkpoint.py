"""Loading and saving Hugging Face checkpoint directories (config.json + safetensors), no torch."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxunlearn import parallel
from jaxunlearn.errors import UserError
from jaxunlearn.models._families import CausalLM, Family, architecture, family_of, load_config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(UserError, ValueError):
    """A checkpoint directory does not hold the tensors its config describes."""


def _checkpoint_name(path: tuple, family: Family) -> tuple[str, bool]:
    """Maps an NNX parameter path to its Hugging Face tensor name and whether to transpose."""
    # A LoRA wrapper keeps the frozen projection under `base`; the checkpoint does not see it.
    parts = [str(p) for p in path if p != "base"]
    if parts[-1] == "kernel":
        # nn.Linear stores [out, in]; Conv1D stores our [in, out].
        return ".".join([*parts[:-1], "weight"]), parts[-2] not in family.conv1d_modules
    if parts[-1] not in ("weight", "bias"):
        # An embedding table is a parameter of its own, `<name>.weight` in transformers.
        return ".".join([*parts, "weight"]), False
    return ".".join(parts), False


def _base_parameters(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Variable]]:
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    yield from nnx.to_flat_state(state)


def _tensor_files(directory: str) -> dict[str, str]:
    """Returns {tensor name: file} from the sharded index, or from every `*.safetensors` file."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{index_path} is not a valid safetensors index: {error}"
            ) from None
        files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
        absent = sorted({f for f in files.values() if not os.path.isfile(f)})
        if absent:
            raise CheckpointError(f"{INDEX_FILE} lists shard files that do not exist: {absent}.")
        return files
    shards = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not shards:
        raise FileNotFoundError(f"No *.safetensors files in checkpoint directory {directory!r}.")
    files: dict[str, str] = {}
    for shard in shards:
        for name in _open(os.path.join(directory, shard), lambda f: list(f.keys())):
            if name in files:
                raise CheckpointError(f"tensor {name!r} is in both {files[name]} and {shard}.")
            files[name] = os.path.join(directory, shard)
    return files


def _with_prefix(
    files: dict[str, str], expected: Mapping[str, Any], prefix: str
) -> dict[str, tuple[str, str]]:
    """Returns {model tensor name: (file, stored name)}, restoring the base-model prefix.

    transformers saves `GPT2Model` tensors as `h.0...` where `GPT2LMHeadModel` has
    `transformer.h.0...`, and loads either into either; so does this.
    """
    located = {}
    for stored, file in files.items():
        name = stored
        if stored not in expected and f"{prefix}.{stored}" in expected:
            name = f"{prefix}.{stored}"
        if name in located:
            raise CheckpointError(f"tensor {name!r} is stored both with and without {prefix!r}.")
        located[name] = (file, stored)
    return located


# safetensors' names of the float dtypes a checkpoint may store.
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@contextlib.contextmanager
def _opened(file: str):
    try:
        with safe_open(file, framework="numpy") as f:
            yield f
    except SafetensorError as error:
        raise CheckpointError(f"cannot read safetensors file {file}: {error}") from None


def _open(file: str, read):
    with _opened(file) as f:
        return read(f)


def _describe(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def load(
    path: str | os.PathLike,
    /,
    *,
    dtype: jnp.dtype = jnp.float32,
    remat: bool = False,
    mesh: Mesh | None = None,
    rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
) -> CausalLM:
    """Loads a local Hugging Face checkpoint directory of a Llama, GPT-2 or OPT model.

    The directory holds `config.json`, whose `model_type` picks the family, and either
    `model.safetensors`, several `*.safetensors` files, or shards listed by
    `model.safetensors.index.json`. Nothing is downloaded and only safetensors are read (never
    pickles). Checkpoints saved from transformers' base model (`GPT2Model`, `OPTModel`, ...,
    whose tensor names lack the `transformer.` or `model.` prefix) load too.

    Args:
        path: The checkpoint directory.
        dtype: Parameter and computation dtype; the stored tensors are cast to it.
        remat: Run the decoder layers as one loop, each rematerialised in the backward pass.
        mesh: Read the parameters straight onto this device mesh, sharded by their logical
            axes and `rules`: each device's block of a tensor is read from its file alone, so
            no process ever holds a whole tensor it does not need. `None`: whole tensors, on
            the default device.
        rules: The logical-axis rules of `mesh`.

    Returns:
        The model, without adapters.

    Raises:
        FileNotFoundError: If the directory lacks config.json or safetensors files.
        UnsupportedConfigError: If the config asks for something this model does not compute.
        CheckpointError: Naming every missing, unexpected or wrongly shaped tensor, or a file that
            is not valid safetensors.
    """
    directory = os.fspath(path)
    config = load_config(directory)
    family = family_of(config)
    abstract = nnx.eval_shape(
        lambda: family.model_class(config, rngs=nnx.Rngs(0), dtype=dtype, remat=remat)
    )
    graphdef, state = nnx.split(abstract)
    expected: dict[str, tuple[tuple, bool, tuple[int, ...]]] = {}
    for param_path, variable in nnx.to_flat_state(state):
        name, transpose = _checkpoint_name(param_path, family)
        shape = tuple(variable.shape)
        expected[name] = (param_path, transpose, shape[::-1] if transpose else shape)

    files = _with_prefix(_tensor_files(directory), expected, family.checkpoint_prefix)
    ignored = {n for n in files if n.endswith(family.ignored_tensors)}
    if config.tie_word_embeddings:
        # Some exporters write the tied head anyway; it is the embedding matrix.
        ignored.add("lm_head.weight")
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected) - ignored)
    by_file: dict[str, list[str]] = {}
    for name in expected.keys() & files.keys():
        by_file.setdefault(files[name][0], []).append(name)

    def read_headers(f):
        slices = {name: f.get_slice(files[name][1]) for name in by_file[file]}
        return {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in slices.items()}

    wrong_shapes, stored_dtypes = [], {}
    for file in by_file:
        for name, (shape, stored_dtype) in _open(file, read_headers).items():
            stored_dtypes[name] = stored_dtype
            if shape != expected[name][2]:
                wrong_shapes.append(f"{name} has shape {shape}, expected {expected[name][2]}")
    problems = []
    if missing:
        problems.append(f"missing tensors: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_describe(unexpected)}")
    if wrong_shapes:
        problems.append(f"wrongly shaped tensors: {_describe(sorted(wrong_shapes))}")
    if problems:
        raise CheckpointError(
            f"checkpoint {directory!r} does not match its config.json: " + "; ".join(problems)
        )

    for name, stored_dtype in stored_dtypes.items():
        if stored_dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name!r} has non-float dtype {stored_dtype}.")

    by_path = {param_path: name for name, (param_path, _, _) in expected.items()}
    shardings = None if mesh is None else parallel.state_shardings(state, mesh, rules=rules)
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(_opened(file)) for file in by_file}

        def read(param_path, variable, index=None):
            """The parameter's block `index` (all of it when None), in its dtype and layout."""
            name = by_path[param_path]
            _, transpose, _ = expected[name]
            file, stored = files[name]
            if index is None:
                block = handles[file].get_tensor(stored)
            else:
                # The stored layout is the transpose of ours: read the transposed block.
                block = handles[file].get_slice(stored)[index[::-1] if transpose else index]
            block = block.T if transpose else block
            return np.asarray(block).astype(variable.dtype, copy=False)

        loaded = []
        flat_shardings = None if shardings is None else dict(nnx.to_flat_state(shardings))
        for param_path, variable in nnx.to_flat_state(state):
            if flat_shardings is None:
                value = jnp.asarray(read(param_path, variable))
            else:
                value = jax.make_array_from_callback(
                    variable.shape,
                    flat_shardings[param_path].get_value(),
                    lambda index, p=param_path, v=variable: read(p, v, index),
                )
            loaded.append((param_path, variable.replace(value=value)))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def save(model: CausalLM, path: str | os.PathLike, /, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes the base model as a Hugging Face checkpoint directory that `load` and
    transformers' `from_pretrained` read back.

    Tensors are written in the model's dtype with PyTorch's [out, in] weight layout. A model
    larger than `max_shard_bytes` is split into shards with a `model.safetensors.index.json`.
    Each file is written to a temporary name and renamed, so a crash never leaves a half-written
    file under its final name; weight files of an earlier save in `path` are replaced.

    Args:
        model: A model without LoRA adapters (adapters are saved separately, in PEFT format).
        path: The directory; created if needed.
        max_shard_bytes: The largest size of one safetensors file.

    Raises:
        ValueError: If the model holds LoRA parameters, which this format cannot express.
    """
    if jax.tree.leaves(nnx.state(model, nnx.LoRAParam)):
        raise ValueError(
            "save writes base models only and this model holds LoRA parameters; save the "
            "adapters separately or save the model before add_lora."
        )
    family = family_of(model)
    tensors: dict[str, np.ndarray] = {}
    for param_path, variable in _base_parameters(model):
        name, transpose = _checkpoint_name(param_path, family)
        array = np.asarray(variable[...])
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)

    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for name, array in tensors.items():
        if shards[-1] and shard_bytes + array.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = array
        shard_bytes += array.nbytes

    directory = os.fspath(path)
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".save-", dir=directory)
    try:
        hf_config = model.config.to_hf()
        hf_config.dtype = str(jnp.dtype(model.dtype))
        hf_config.architectures = [architecture(model.config)]
        hf_config.save_pretrained(staging)
        if len(shards) == 1:
            file_names = [SINGLE_FILE]
        else:
            file_names = [
                f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
            ]
        for file_name, shard in zip(file_names, shards, strict=True):
            # transformers refuses safetensors files whose metadata lacks a known format.
            save_file(shard, os.path.join(staging, file_name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
                "weight_map": {
                    name: file_name
                    for file_name, shard in zip(file_names, shards, strict=True)
                    for name in shard
                },
            }
            with open(os.path.join(staging, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        # Stale weight files of an earlier save would be read as part of this checkpoint.
        for old in os.listdir(directory):
            if (old.endswith(".safetensors") or old == INDEX_FILE) and old not in file_names:
                os.remove(os.path.join(directory, old))
        for file_name in os.listdir(staging):
            os.replace(os.path.join(staging, file_name), os.path.join(directory, file_name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
