"""Fine-tuning with optax: LoRA adapters by default, every parameter on request.

One optimizer step is a single jitted, pure function of (trainable tree, optimizer state, frozen
tree, micro-batches, step): it averages the gradients of `grad_accumulation` micro-batches and
applies clipped AdamW with a warmup + cosine schedule. Everything random is a function of
`TrainConfig.seed` and the step number (the data order of each epoch, the dropout keys of each
micro-batch), so a run resumed from a checkpoint ends with the same adapter, bit for bit, as a
run that was never interrupted. A checkpoint records digests of the data it was trained on, so
that a run is never resumed on other data.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxunlearn import parallel
from jaxunlearn.batch import Batch, model_example_losses, model_mean_loss
from jaxunlearn.checkpoint import Checkpointer
from jaxunlearn.data import DataError
from jaxunlearn.errors import SettingsError, UserError

__all__ = [
    "BatchSource",
    "ResumeMismatchError",
    "TrainConfig",
    "TrainHistory",
    "TrainResult",
    "TrainingDivergedError",
    "default_warmup_steps",
    "finetune",
    "steps_for_epochs",
]

logger = logging.getLogger(__name__)

# Settings that change how a run is observed and saved, not the adapter it produces: a resumed
# run may change them.
_RESUMABLE_CHANGES = frozenset({"eval_every", "checkpoint_every", "keep_checkpoints"})

# A fine-tune moves a weight by a few tenths, pre-training from scratch by a few units. Adam
# moves every coordinate by about the learning rate per step whatever the gradient's size, so
# a move of 1000 takes 1000 / learning_rate steps of one sign: 5 million at 2e-4, a single step
# at 1e4. No run that learns gets there; a run whose learning rate is far too high does, and
# its loss need not show it (normalization layers keep the loss near that of a uniform guess).
_MAX_PARAMETER_CHANGE = 1e3
# Examples per `batch` call when the training data is digested.
_DIGEST_CHUNK = 256


class TrainingDivergedError(UserError, RuntimeError):
    """Training diverged: a loss, a gradient or a trained parameter is not finite, or a
    parameter moved absurdly far (see `finetune`). Lowering the learning rate is the fix."""


class ResumeMismatchError(UserError, ValueError):
    """A checkpoint to resume from belongs to another run: another `TrainConfig`, other
    training data, or a model whose trainable parameters do not match it."""


class BatchSource(Protocol):
    """What training reads: a sized collection of tokenized examples that makes padded batches.

    `jaxunlearn.data`'s tokenized datasets implement it.
    """

    def __len__(self) -> int:
        """The number of examples."""
        ...

    def batch(
        self, indices: Sequence[int] | np.ndarray, /, *, batch_size: int | None = None
    ) -> Batch:
        """The examples at `indices` as a `Batch` of numpy arrays.

        With `batch_size` larger than `len(indices)`, rows after the examples only pad the batch
        (their `example_mask` is False). The length axis is padded to a static bucket length.
        """
        ...


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of a fine-tuning run.

    Every optimizer step consumes `batch_size * grad_accumulation` examples. An epoch is a
    permutation of the training set drawn from `numpy.random.default_rng((seed, epoch))`; its
    last step may hold fewer examples, and the gradient of a step is always the mean over the
    real examples it holds.

    Attributes:
        learning_rate: Peak learning rate of AdamW.
        warmup_steps: Steps of linear warmup from 0 to `learning_rate` (then cosine decay to 0
            at `num_steps`, as `optax.warmup_cosine_decay_schedule`); must be below `num_steps`.
        num_steps: Total number of optimizer steps.
        batch_size: Rows of one micro-batch (one `BatchSource.batch` call).
        grad_accumulation: Micro-batches whose gradients are averaged into one step.
        max_grad_norm: Global-norm clipping threshold applied before AdamW.
        weight_decay: Decoupled weight decay of AdamW.
        l2_regularization: μ of an L2 penalty (μ/2)‖Θ‖² on the trained parameters, added to
            the mean loss (so it is part of the objective and of its gradient, unlike AdamW's
            decoupled decay). A fine-tune that minimizes a penalized objective is what
            influence-function unlearning assumes: pass the same μ to LLMEraser
            (`EraserSettings.l2_regularization`).
        eval_every: Steps between evaluations of `eval_data` (also evaluated at the end).
        checkpoint_every: Steps between checkpoints (a checkpoint is also written at the end).
        keep_checkpoints: How many of the newest checkpoints to keep.
        seed: Seeds the data order and dropout.
        group_by_length: Make each step read examples of similar length (sorted within
            windows of 16 steps of the epoch's permutation, then the steps shuffled), so that
            batches pad to shorter buckets. The order still depends only on the seed.

    Raises:
        SettingsError: If a setting is out of range (the message names it).
    """

    learning_rate: float = 2e-4
    warmup_steps: int = 0
    num_steps: int = 100
    batch_size: int = 8
    grad_accumulation: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    l2_regularization: float = 0.0
    eval_every: int = 50
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    seed: int = 0
    group_by_length: bool = False

    def __post_init__(self):
        for name in ("learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise SettingsError(
                    f"TrainConfig.{name} must be a positive finite number, got {value!r}."
                )
        for name in ("weight_decay", "l2_regularization"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value < math.inf:
                raise SettingsError(
                    f"TrainConfig.{name} must be a finite number >= 0, got {value!r}."
                )
        for name in (
            "num_steps",
            "batch_size",
            "grad_accumulation",
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise SettingsError(
                    f"TrainConfig.{name} must be a positive integer, got {value!r}."
                )
        for name in ("warmup_steps", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise SettingsError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}.")
        if self.warmup_steps >= self.num_steps:
            raise SettingsError(
                f"TrainConfig.warmup_steps ({self.warmup_steps}) must be smaller than num_steps "
                f"({self.num_steps}): the cosine decay needs at least one step."
            )

    @property
    def examples_per_step(self) -> int:
        """`batch_size * grad_accumulation`."""
        return self.batch_size * self.grad_accumulation


def steps_for_epochs(epochs: float, num_examples: int, examples_per_step: int, /) -> int:
    """Optimizer steps of `epochs` passes over `num_examples` examples: the nearest integer
    (halves to even, as `round`), at least 1.

    Raises:
        SettingsError: If `epochs` is not a positive finite number or a count is not a
            positive integer.
    """
    if not _is_real(epochs) or not 0 < epochs < math.inf:
        raise SettingsError(f"epochs must be a positive finite number, got {epochs!r}.")
    for name, value in (("num_examples", num_examples), ("examples_per_step", examples_per_step)):
        if not _is_int(value) or value <= 0:
            raise SettingsError(f"{name} must be a positive integer, got {value!r}.")
    return max(1, round(epochs * num_examples / examples_per_step))


def default_warmup_steps(num_steps: int, /) -> int:
    """The warmup of the demo and of `jaxunlearn finetune` unless told: a tenth of the steps."""
    return num_steps // 10


@dataclasses.dataclass
class TrainHistory:
    """What happened during a run, step by step (including steps run before a resume).

    Attributes:
        steps: The step number after each optimizer update (1, 2, ...).
        losses: The mean training loss of each step's examples, before its update.
        grad_norms: The global gradient norm of each step, before clipping.
        learning_rates: The learning rate each step's update used.
        tokens_per_second: Real (attention-mask) tokens of each step over its wall-clock time,
            compilation excluded (see `compile_seconds`).
        eval_steps: The steps after which `eval_data` was evaluated.
        eval_losses: The mean loss over `eval_data` at those steps.
        wall_seconds: Wall-clock time of the `finetune` call that returned this history.
        compile_seconds: The part of `wall_seconds` spent compiling the training step (once per
            batch shape, ahead of the step's first run), so that a cost can be compared after
            compilation.
        resumed_from: The checkpoint step this call started from, `None` for a fresh start.
    """

    steps: list[int] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    grad_norms: list[float] = dataclasses.field(default_factory=list)
    learning_rates: list[float] = dataclasses.field(default_factory=list)
    tokens_per_second: list[float] = dataclasses.field(default_factory=list)
    eval_steps: list[int] = dataclasses.field(default_factory=list)
    eval_losses: list[float] = dataclasses.field(default_factory=list)
    wall_seconds: float = 0.0
    compile_seconds: float = 0.0
    resumed_from: int | None = None


class TrainResult(NamedTuple):
    """The outcome of `finetune`.

    Attributes:
        model: The model passed in, its trainable parameters now updated in place.
        history: Losses, evaluations and throughput of the run.
        opt_state: The optimizer state after the last step (sharded like the parameters when
            training ran on a mesh).
    """

    model: nnx.Module
    history: TrainHistory
    opt_state: optax.OptState


def finetune(
    model: nnx.Module,
    train_data: BatchSource,
    /,
    *,
    config: TrainConfig,
    eval_data: BatchSource | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    trainable: nnx.filterlib.Filter = nnx.LoRAParam,
    progress: bool = True,
    mesh: Mesh | None = None,
    rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
) -> TrainResult:
    """Trains the parameters selected by `trainable` to minimise the mean response-token NLL.

    Dropout (e.g. of LoRA adapters) is active during training steps and off for evaluation,
    whatever mode the model is in; the model's mode is not changed.

    Args:
        model: A model called as `model(input_ids, attention_mask)` (e.g. a Llama with
            `add_lora`). Its trainable parameters are updated in place when training ends; if
            training stops with an exception the model keeps its original weights (the
            checkpoints hold the progress).
        train_data: The training examples.
        config: The run's settings.
        eval_data: Examples whose mean loss is measured every `config.eval_every` steps and at
            the end, in batches of `config.batch_size` in their stored order.
        checkpoint_dir: Where to save checkpoints (trainable tree, optimizer state, step, random
            key, config and history) every `config.checkpoint_every` steps and at the end.
            `None` saves nothing.
        resume: Continue from the latest checkpoint in `checkpoint_dir`, or start from scratch
            if it holds none. The run must use the same `TrainConfig` (up to `eval_every`,
            `checkpoint_every` and `keep_checkpoints`), the same training data (the same
            example ids, when `train_data` has `ids`, and the same tokens and loss masks, as
            recorded by digests in the checkpoint; a checkpoint written before digests were
            recorded is resumed with a warning), and a model with the same structure.
        trainable: An NNX filter for the parameters to train: `nnx.LoRAParam` (the adapters
            only) or `nnx.Param` (every parameter, e.g. to pre-train a small base model).
        progress: Show a tqdm progress bar with the loss and tokens per second.
        mesh: Train on this device mesh (`parallel.make_mesh`): the model's variables are
            moved onto it first, in place, sharded by their logical axes and `rules`; the
            optimizer state is sharded like the parameters; the rows of every batch are split
            over the mesh axes of `"batch"`. `None`: the default device.
        rules: The logical-axis rules of `mesh`.

    Returns:
        The trained model and the history of the run.

    Training is refused as diverged (`TrainingDivergedError`, the model keeps its weights)
    when a step's loss or gradient norm is not finite (that step is not applied), or, checked
    before every checkpoint and after the last step, when a trained parameter is not finite,
    when one moved by more than 1000 from its value in `model` (an honest bound: Adam moves
    a coordinate by about the learning rate per step, so no run that learns gets there, while
    a learning rate of 1e4 moves every weight by 1e4 in its first step), or when the last
    evaluation of `eval_data` is not finite. Nothing is saved then.

    Raises:
        DataError: If `train_data` or `eval_data` holds no example.
        SettingsError: For a filter that selects no parameter, `resume` without
            `checkpoint_dir`, `group_by_length` without per-example lengths, or a batch size
            that the mesh's batch axes do not divide.
        ResumeMismatchError: If the checkpoint to resume from was made by a different config,
            training data or model.
        FileExistsError: If `checkpoint_dir` already holds checkpoints and `resume` is False.
        TrainingDivergedError: If training diverged (see above).
        ValueError: If a `BatchSource` returns batches of the wrong size.
    """
    # Activations keep their rows on their devices while the steps are traced.
    with parallel.activations_on(parallel.Placement(mesh, rules)):
        return _finetune(
            model,
            train_data,
            config=config,
            eval_data=eval_data,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            trainable=trainable,
            progress=progress,
            mesh=mesh,
            rules=rules,
        )


def _finetune(
    model,
    train_data,
    /,
    *,
    config,
    eval_data,
    checkpoint_dir,
    resume,
    trainable,
    progress,
    mesh,
    rules,
) -> TrainResult:
    started = time.perf_counter()
    num_examples = _checked_length(train_data, "train_data")
    if eval_data is not None:
        _checked_length(eval_data, "eval_data")
    if resume and checkpoint_dir is None:
        raise SettingsError("resume=True needs a checkpoint_dir to resume from.")

    # Views fix dropout on for the step and off for evaluation without touching `model`.
    train_view = nnx.view(model, deterministic=False, raise_if_not_found=False)
    eval_view = nnx.view(model, deterministic=True, raise_if_not_found=False)
    graphdef, params, frozen = nnx.split(train_view, trainable, ...)
    eval_graphdef = nnx.split(eval_view, trainable, ...)[0]
    if not jax.tree.leaves(params):
        raise SettingsError(
            f"The filter trainable={trainable!r} selects no parameter of the model."
        )
    settings = _OptimizerSettings.from_config(config)
    placement = None
    if mesh is not None:
        placement = _Placement.of(params, frozen, settings, config.batch_size, mesh, rules)
        params = parallel.put(params, placement.params)
        frozen = parallel.put(frozen, placement.frozen)
        # The model lives on the mesh from here on, whatever happens to the run.
        nnx.update(model, params, frozen)
    # The step donates its inputs; copies keep the model's own arrays valid until the end, and
    # those are where the divergence check measures how far training moved the parameters.
    initial_params, params = params, jax.tree.map(jnp.copy, params)
    rng_data = jax.random.key_data(jax.random.key(config.seed))
    train_step, static = _jitted_train_step, {"graphdef": graphdef, "settings": settings}
    if placement is None:
        opt_state = _optimizer(settings).init(params)
    else:
        opt_state = jax.jit(_optimizer(settings).init, out_shardings=placement.opt_state)(params)
        rng_data = parallel.put(rng_data, placement.replicated)
        train_step, static = placement.train_step(graphdef, settings), {}

    checkpointer, step, history, data_digest = None, 0, TrainHistory(), None
    if checkpoint_dir is not None:
        data_digest = _data_digest(train_data)
        checkpointer = Checkpointer(checkpoint_dir, keep=config.keep_checkpoints)
        try:
            latest = _latest_to_resume(checkpointer, resume)
            if latest is not None:
                params, opt_state, step, rng_data, history = _restore(
                    checkpointer,
                    latest,
                    config,
                    num_examples,
                    data_digest,
                    params,
                    opt_state,
                    rng_data,
                )
        except BaseException:
            checkpointer.close()
            raise

    lengths = getattr(train_data, "lengths", None)
    if config.group_by_length and lengths is None:
        raise SettingsError(
            "TrainConfig.group_by_length needs train_data with per-example `lengths` "
            "(a TokenizedDataset has them)."
        )
    order = _DataOrder(num_examples, config, None if lengths is None else np.asarray(lengths))
    bar = tqdm(
        total=config.num_steps, initial=step, disable=not progress, desc="finetune", unit="step"
    )
    compiled_shapes: set[tuple[tuple[int, ...], ...]] = set()
    checked_step = None
    try:
        tick = time.perf_counter()
        while step < config.num_steps:
            batches, tokens = _step_batches(train_data, order.indices(step), config)
            if placement is not None:
                # Each process builds only its own devices' rows (see `parallel.put`).
                batches = parallel.put(batches, placement.batches)
            arguments = (params, opt_state, frozen, batches, rng_data, jnp.asarray(step, jnp.int32))
            shapes = tuple(np.shape(leaf) for leaf in jax.tree.leaves(batches))
            if shapes not in compiled_shapes:
                # Compiled ahead of its first run (the call below reuses the executable), so
                # that compilation is timed apart from training.
                compiling = time.perf_counter()
                train_step.lower(*arguments, **static).compile()
                compile_seconds = time.perf_counter() - compiling
                history.compile_seconds += compile_seconds
                tick += compile_seconds
                compiled_shapes.add(shapes)
            params, opt_state, metrics = train_step(*arguments, **static)
            metrics = {name: float(value) for name, value in metrics.items()}
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                raise TrainingDivergedError(
                    f"Training diverged at step {step + 1}: loss {metrics['loss']}, gradient "
                    f"norm {metrics['grad_norm']}, learning rate {metrics['learning_rate']:.3g} "
                    f"(peak TrainConfig.learning_rate {config.learning_rate:g}). Lower the "
                    "learning rate (e.g. tenfold) or check the data."
                )
            step += 1
            seconds = time.perf_counter() - tick
            history.steps.append(step)
            history.losses.append(metrics["loss"])
            history.grad_norms.append(metrics["grad_norm"])
            history.learning_rates.append(metrics["learning_rate"])
            history.tokens_per_second.append(tokens / seconds)
            postfix = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{tokens / seconds:.0f}"}
            if eval_data is not None and (
                step % config.eval_every == 0 or step == config.num_steps
            ):
                eval_loss = _evaluate(
                    eval_graphdef, params, frozen, eval_data, config.batch_size, placement
                )
                history.eval_steps.append(step)
                history.eval_losses.append(eval_loss)
            if history.eval_losses:
                postfix["eval"] = f"{history.eval_losses[-1]:.4f}"
            if checkpointer is not None and (
                step % config.checkpoint_every == 0 or step == config.num_steps
            ):
                _check_not_diverged(params, initial_params, step, history, config)
                checked_step = step
                metadata = {
                    "train_config": dataclasses.asdict(config),
                    "num_examples": num_examples,
                    "train_data": data_digest,
                    "step": step,
                    "data_position": order.position(step),
                    "history": _history_record(history),
                }
                checkpointer.save(
                    step, _checkpoint_tree(params, opt_state, step, rng_data), metadata=metadata
                )
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            tick = time.perf_counter()
        if checked_step != step:
            _check_not_diverged(params, initial_params, step, history, config)
    finally:
        bar.close()
        if checkpointer is not None:
            checkpointer.close()

    nnx.update(model, params)
    history.wall_seconds = time.perf_counter() - started
    return TrainResult(model, history, opt_state)


class _OptimizerSettings(NamedTuple):
    """The part of `TrainConfig` that defines the update (optimizer and penalty): hashable, a
    static jit argument.

    The seed is not in it, so runs that differ only in their seed share one compiled step.
    """

    learning_rate: float
    warmup_steps: int
    num_steps: int
    max_grad_norm: float
    weight_decay: float
    l2_regularization: float

    @classmethod
    def from_config(cls, config: TrainConfig) -> _OptimizerSettings:
        return cls(
            float(config.learning_rate),
            int(config.warmup_steps),
            int(config.num_steps),
            float(config.max_grad_norm),
            float(config.weight_decay),
            float(config.l2_regularization),
        )


def _schedule(settings: _OptimizerSettings) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        decay_steps=settings.num_steps,
    )


def _optimizer(settings: _OptimizerSettings) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(settings.max_grad_norm),
        optax.adamw(_schedule(settings), weight_decay=settings.weight_decay),
    )


def _train_step(
    params: nnx.State,
    opt_state: optax.OptState,
    frozen: nnx.State,
    batches: Batch,
    rng_data: jax.Array,
    step: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    settings: _OptimizerSettings,
) -> tuple[nnx.State, optax.OptState, dict[str, jax.Array]]:
    """One optimizer update from micro-batches stacked on a leading axis ([M, B, T] arrays)."""

    def loss_fn(params, batch, key):
        # copy: fresh Variables belong to this trace (inside scan), so reseeding may set them.
        model = nnx.merge(graphdef, params, frozen, copy=True)
        # Dropout keys are a function of (seed, step, micro-batch) only, so a resumed run draws
        # exactly the masks the uninterrupted run drew.
        nnx.reseed(model, dropout=key)
        return model_mean_loss(model, batch)

    grad_fn = jax.value_and_grad(loss_fn)
    num_micro = batches.input_ids.shape[0]
    step_key = jax.random.fold_in(jax.random.wrap_key_data(rng_data), step)
    micro_keys = jax.random.split(step_key, num_micro)
    if num_micro == 1:
        loss, grads = grad_fn(params, jax.tree.map(lambda x: x[0], batches), micro_keys[0])
    else:
        # Each micro-batch's mean is weighted by its number of real examples: the result is the
        # mean over all the step's examples, as one big batch would give.
        def accumulate(carry, inputs):
            grad_sum, loss_sum, count = carry
            batch, key = inputs
            real = jnp.sum(jnp.asarray(batch.example_mask, jnp.float32))
            loss, grads = grad_fn(params, batch, key)
            grad_sum = jax.tree.map(lambda total, g: total + real * g, grad_sum, grads)
            return (grad_sum, loss_sum + real * loss, count + real), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grad_sum, loss_sum, count), _ = jax.lax.scan(accumulate, init, (batches, micro_keys))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda total: total / count, grad_sum)
        loss = loss_sum / count
    if settings.l2_regularization:
        # The penalty's gradient μΘ joins the loss's before clipping: one objective. The logged
        # loss stays the data loss, comparable across settings.
        grads = jax.tree.map(
            lambda g, p: g + settings.l2_regularization * p.astype(g.dtype), grads, params
        )
    updates, opt_state = _optimizer(settings).update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": _schedule(settings)(step),
    }
    return params, opt_state, metrics


_jitted_train_step = jax.jit(
    _train_step,
    static_argnames=("graphdef", "settings"),
    donate_argnames=("params", "opt_state"),
)


class _Placement(NamedTuple):
    """Where a run on a mesh keeps each part of its state: the shardings of the trainable and
    frozen trees, the optimizer state, the stacked micro-batches and the replicated scalars."""

    params: nnx.State
    frozen: nnx.State
    opt_state: Any
    batches: Batch
    batch: Batch
    replicated: jax.sharding.NamedSharding

    @classmethod
    def of(
        cls,
        params: nnx.State,
        frozen: nnx.State,
        settings: _OptimizerSettings,
        batch_size: int,
        mesh: Mesh,
        rules: parallel.LogicalRules,
    ) -> _Placement:
        """Raises `SettingsError` for a batch size the mesh's batch axes do not divide."""
        param_shardings = parallel.state_shardings(params, mesh, rules=rules)
        return cls(
            params=param_shardings,
            frozen=parallel.state_shardings(frozen, mesh, rules=rules),
            opt_state=parallel.optimizer_state_shardings(
                _optimizer(settings), params, param_shardings, mesh
            ),
            batches=parallel.batch_shardings(batch_size, mesh, rules=rules, stacked=True),
            batch=parallel.batch_shardings(batch_size, mesh, rules=rules),
            replicated=parallel.replicated(mesh),
        )

    def train_step(self, graphdef: nnx.GraphDef, settings: _OptimizerSettings):
        """The training step for these shardings (its static arguments bound): the state
        stays where it is, and its buffers are donated as on one device."""
        return jax.jit(
            functools.partial(_train_step, graphdef=graphdef, settings=settings),
            donate_argnums=(0, 1),
            in_shardings=(
                self.params,
                self.opt_state,
                self.frozen,
                self.batches,
                self.replicated,
                self.replicated,
            ),
            out_shardings=(self.params, self.opt_state, self.replicated),
        )


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _eval_sums(
    params: nnx.State, frozen: nnx.State, batch: Batch, *, graphdef: nnx.GraphDef
) -> tuple[jax.Array, jax.Array]:
    """The sum of the per-example losses of a batch and its number of real examples."""
    model = nnx.merge(graphdef, params, frozen)
    losses = model_example_losses(model, batch)
    return jnp.sum(losses), jnp.sum(jnp.asarray(batch.example_mask, jnp.float32))


def _evaluate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    frozen: nnx.State,
    data: BatchSource,
    batch_size: int,
    placement: _Placement | None = None,
) -> float:
    """The mean loss over every example of `data` (rows split over the mesh with `placement`)."""
    total, count = 0.0, 0.0
    for start in range(0, len(data), batch_size):
        indices = np.arange(start, min(start + batch_size, len(data)))
        batch = _checked_batch(data.batch(indices, batch_size=batch_size), batch_size, "eval_data")
        if placement is not None:
            batch = parallel.put(batch, placement.batch)
        loss_sum, real = _eval_sums(params, frozen, batch, graphdef=graphdef)
        total += float(loss_sum)
        count += float(real)
    return total / max(count, 1.0)


class _DataOrder:
    """Which examples each step reads: a function of (seed, step) alone, so resume recomputes it.

    Step `s` is step `s % steps_per_epoch` of epoch `s // steps_per_epoch`; epoch `e` reads the
    permutation `default_rng((seed, e)).permutation(n)` in slices of `examples_per_step`.
    """

    def __init__(self, num_examples: int, config: TrainConfig, lengths: np.ndarray | None):
        self._num_examples = num_examples
        self._per_step = config.examples_per_step
        self._seed = config.seed
        self._lengths = lengths if config.group_by_length else None
        self.steps_per_epoch = math.ceil(num_examples / self._per_step)
        self._epoch, self._permutation = -1, np.empty(0, np.int64)

    def position(self, step: int) -> dict[str, int]:
        """The (epoch, offset into its permutation) of the first example step `step` reads."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "offset": within * self._per_step}

    def indices(self, step: int) -> np.ndarray:
        position = self.position(step)
        if position["epoch"] != self._epoch:
            rng = np.random.default_rng((self._seed, position["epoch"]))
            permutation = rng.permutation(self._num_examples)
            if self._lengths is not None:
                permutation = _group_by_length(permutation, self._lengths, self._per_step, rng)
            self._epoch, self._permutation = position["epoch"], permutation
        return self._permutation[position["offset"] : position["offset"] + self._per_step]


# How many steps' worth of shuffled examples are sorted by length together: large enough that
# steps hold examples of similar length, small enough that each epoch stays well shuffled.
_LENGTH_GROUP_STEPS = 16


def _group_by_length(
    permutation: np.ndarray, lengths: np.ndarray, per_step: int, rng: np.random.Generator
) -> np.ndarray:
    """Rearranges a shuffled epoch so that each step reads examples of similar length.

    Windows of `_LENGTH_GROUP_STEPS` steps are sorted by length, then the full steps are
    shuffled among themselves (a last, partial step stays last), so padding shrinks while
    every example is still read once per epoch in an order drawn from the seed.
    """
    window = per_step * _LENGTH_GROUP_STEPS
    grouped = np.concatenate(
        [
            chunk[np.argsort(lengths[chunk], kind="stable")]
            for chunk in np.split(permutation, range(window, len(permutation), window))
        ]
    )
    full_steps = len(grouped) // per_step
    steps = grouped[: full_steps * per_step].reshape(full_steps, per_step)
    return np.concatenate(
        [steps[rng.permutation(full_steps)].reshape(-1), grouped[full_steps * per_step :]]
    )


def _step_batches(data: BatchSource, indices: np.ndarray, config: TrainConfig) -> tuple[Batch, int]:
    """The step's micro-batches stacked into [M, B, T] arrays, and their number of real tokens.

    Micro-batches come from separate `batch` calls and may have different bucket lengths; the
    shorter ones are padded on the right with masked tokens, which change no loss.
    """
    batch_size, num_micro = config.batch_size, config.grad_accumulation
    micro_batches: list[Batch | None] = []
    for chunk in np.array_split(indices, num_micro):
        if len(chunk) == 0:
            micro_batches.append(None)
        else:
            batch = data.batch(chunk, batch_size=batch_size)
            micro_batches.append(_checked_batch(batch, batch_size, "train_data"))
    real_batches = [batch for batch in micro_batches if batch is not None]
    # A step with fewer examples than micro-batches (the end of an epoch) fills the remaining
    # slots with copies whose rows are all padding: they keep the compiled shape and weigh zero.
    filler = real_batches[0]._replace(example_mask=np.zeros_like(real_batches[0].example_mask))
    micro_batches = [filler if batch is None else batch for batch in micro_batches]
    length = max(batch.input_ids.shape[1] for batch in micro_batches)
    padded = [_pad_length(batch, length) for batch in micro_batches]
    stacked = Batch(*(np.stack(arrays) for arrays in zip(*padded, strict=True)))
    tokens = sum(
        int(np.sum(np.asarray(batch.attention_mask)[np.asarray(batch.example_mask, bool)]))
        for batch in real_batches
    )
    return stacked, tokens


def _pad_length(batch: Batch, length: int) -> Batch:
    extra = length - batch.input_ids.shape[1]
    if extra == 0:
        return batch
    widths = ((0, 0), (0, extra))
    return Batch(
        np.pad(np.asarray(batch.input_ids), widths),
        np.pad(np.asarray(batch.attention_mask), widths),
        np.pad(np.asarray(batch.loss_mask), widths),
        np.asarray(batch.example_mask),
    )


def _checked_batch(batch: Batch, batch_size: int, name: str) -> Batch:
    shape = np.shape(batch.input_ids)
    if len(shape) != 2 or shape[0] != batch_size:
        raise ValueError(
            f"{name}.batch(..., batch_size={batch_size}) returned input_ids of shape {shape}; "
            f"expected [{batch_size}, length]."
        )
    for field in ("attention_mask", "loss_mask"):
        if np.shape(getattr(batch, field)) != shape:
            raise ValueError(
                f"{name}.batch returned {field} of shape {np.shape(getattr(batch, field))}, "
                f"but input_ids of shape {shape}."
            )
    if np.shape(batch.example_mask) != (batch_size,):
        raise ValueError(
            f"{name}.batch returned example_mask of shape {np.shape(batch.example_mask)}; "
            f"expected ({batch_size},)."
        )
    return batch


def _checked_length(data: BatchSource, name: str) -> int:
    size = len(data)
    if size == 0:
        raise DataError(f"{name} holds no example.")
    return size


@jax.jit
def _largest_change(params: nnx.State, initial: nnx.State) -> jax.Array:
    """The largest |Θ - Θ₀| over every trained parameter; NaN or inf where one is not finite."""
    changes = [
        jnp.max(jnp.abs(p.astype(jnp.float32) - q.astype(jnp.float32)))
        for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(initial), strict=True)
        if p.size
    ]
    return jnp.max(jnp.stack(changes)) if changes else jnp.zeros((), jnp.float32)


def _check_not_diverged(
    params: nnx.State, initial: nnx.State, step: int, history: TrainHistory, config: TrainConfig
) -> None:
    """Raises TrainingDivergedError if the parameters after `step` show a diverged run."""
    change = float(_largest_change(params, initial))
    eval_loss = (
        history.eval_losses[-1] if history.eval_steps and history.eval_steps[-1] == step else None
    )
    if not math.isfinite(change):
        problem = "the trained parameters are not finite"
    elif change > _MAX_PARAMETER_CHANGE:
        problem = (
            f"a trained parameter moved by {change:.3g} from its starting value (more than "
            f"{_MAX_PARAMETER_CHANGE:g}, which no run that learns reaches)"
        )
    elif eval_loss is not None and not math.isfinite(eval_loss):
        problem = f"the eval loss is {eval_loss}"
    else:
        return
    loss = history.losses[-1] if history.losses else math.nan
    rate = history.learning_rates[-1] if history.learning_rates else config.learning_rate
    raise TrainingDivergedError(
        f"Training diverged by step {step}: {problem}; that step's loss was {loss:.4g} at "
        f"learning rate {rate:.3g} (peak TrainConfig.learning_rate {config.learning_rate:g}). "
        "Lower the learning rate (e.g. tenfold) and train again."
    )


def _data_digest(data: BatchSource) -> dict[str, str | None]:
    """SHA-256 digests of what a run trains on: the example ids, and every example's tokens.

    The tokens digest covers each example's real (attention-mask) token ids and their loss
    mask, in order, so it does not depend on padding or bucket lengths. `ids` is `None` for a
    source without an `ids` attribute.
    """
    ids = getattr(data, "ids", None)
    ids_digest = None
    if ids is not None:
        ids_digest = hashlib.sha256(json.dumps([str(i) for i in ids]).encode()).hexdigest()
    tokens = hashlib.sha256()
    for start in range(0, len(data), _DIGEST_CHUNK):
        batch = data.batch(np.arange(start, min(start + _DIGEST_CHUNK, len(data))))
        input_ids, attention = np.asarray(batch.input_ids), np.asarray(batch.attention_mask)
        loss_mask, real_rows = np.asarray(batch.loss_mask), np.asarray(batch.example_mask, bool)
        for row in np.flatnonzero(real_rows):
            real = attention[row].astype(bool)
            # The length first, so that the bytes of consecutive examples cannot run together.
            tokens.update(np.int64(real.sum()).tobytes())
            tokens.update(input_ids[row][real].astype(np.int64).tobytes())
            tokens.update(loss_mask[row][real].astype(np.float32).tobytes())
    return {"ids_sha256": ids_digest, "tokens_sha256": tokens.hexdigest()}


def _checkpoint_tree(
    params: nnx.State, opt_state: optax.OptState, step: int, rng_data: jax.Array
) -> dict[str, Any]:
    return {
        "trainable": params,
        "opt_state": opt_state,
        "step": np.asarray(step, np.int64),
        "rng": rng_data,
    }


def _history_record(history: TrainHistory) -> dict[str, Any]:
    record = dataclasses.asdict(history)
    # Per-call facts, not part of the run's record.
    del record["wall_seconds"], record["compile_seconds"], record["resumed_from"]
    return record


def _latest_to_resume(checkpointer: Checkpointer, resume: bool) -> int | None:
    """The checkpoint step to resume from, `None` to start from scratch."""
    latest = checkpointer.latest_step()
    if latest is not None and not resume:
        raise FileExistsError(
            f"{checkpointer.directory} already holds checkpoints (latest step {latest}); "
            "pass resume=True to continue from it, or choose another checkpoint_dir."
        )
    if resume and latest is None:
        logger.info("No checkpoint in %s: training from scratch.", checkpointer.directory)
    elif resume:
        logger.info("Resuming from step %d of %s.", latest, checkpointer.directory)
    return latest


def _restore(
    checkpointer: Checkpointer,
    step: int,
    config: TrainConfig,
    num_examples: int,
    data_digest: dict[str, str | None],
    params: nnx.State,
    opt_state: optax.OptState,
    rng_data: jax.Array,
) -> tuple[nnx.State, optax.OptState, int, jax.Array, TrainHistory]:
    """Reads checkpoint `step` after checking that it belongs to this run."""
    where = f"checkpoint step {step} in {checkpointer.directory}"
    metadata = checkpointer.metadata(step)
    saved = metadata.get("train_config", {})
    current = dataclasses.asdict(config)
    changed = [
        name
        for name in current
        if name not in _RESUMABLE_CHANGES and saved.get(name) != current[name]
    ]
    if changed:
        details = ", ".join(f"{name}: {saved.get(name)!r} -> {current[name]!r}" for name in changed)
        raise ResumeMismatchError(
            f"Cannot resume from {where}: it was trained with a different TrainConfig "
            f"({details}). Resume with the same config, or choose another checkpoint_dir."
        )
    if metadata.get("num_examples") != num_examples:
        raise ResumeMismatchError(
            f"Cannot resume from {where}: it was trained on {metadata.get('num_examples')} "
            f"examples, train_data has {num_examples}."
        )
    _check_same_data(metadata.get("train_data"), data_digest, where)
    target = _checkpoint_tree(params, opt_state, step, rng_data)
    try:
        restored = checkpointer.restore(step, target=target)
    except ValueError as error:
        raise ResumeMismatchError(
            f"Cannot resume from {where}: the model's trainable parameters or the optimizer "
            f"do not match it ({error})"
        ) from error
    history = TrainHistory(**metadata.get("history", {}), resumed_from=step)
    return (
        restored["trainable"],
        restored["opt_state"],
        int(restored["step"]),
        restored["rng"],
        history,
    )


def _check_same_data(
    saved: dict[str, str | None] | None, current: dict[str, str | None], where: str
) -> None:
    """Raises ResumeMismatchError unless `current` digests the data the checkpoint saw."""
    if saved is None:
        logger.warning(
            "%s records no digest of its training data (it was written by an older jaxunlearn): "
            "resuming without checking that train_data is the data it was trained on.",
            where,
        )
        return
    saved_ids, current_ids = saved.get("ids_sha256"), current["ids_sha256"]
    if saved_ids is not None and current_ids is not None and saved_ids != current_ids:
        raise ResumeMismatchError(
            f"Cannot resume from {where}: train_data holds other example ids (or the same in "
            "another order) than the data it was trained on. Resume with the same data, or "
            "choose another checkpoint_dir."
        )
    if saved.get("tokens_sha256") != current["tokens_sha256"]:
        raise ResumeMismatchError(
            f"Cannot resume from {where}: train_data holds other tokens than the data it was "
            "trained on (the texts changed, or they were tokenized with another tokenizer, "
            "max_length or truncation). Resume with the same data, or choose another "
            "checkpoint_dir."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
