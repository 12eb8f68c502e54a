"""LLMEraser's update against dense float64 linear algebra, and its request rules.

References solve with the dense Hessian or Gauss-Newton matrix of the mean objective over the
whole training set (`unlearn_fixtures.DenseObjective`). The model's float32 intermediates
(RMSNorm, the LoRA path) bound the agreement at about 1e-6 relative; see test_curvature.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from unlearn_fixtures import DenseObjective, random_examples, tiny_lora_model

import kernels
from jaxunlearn import curvature
from jaxunlearn.data import Example
from jaxunlearn.unlearn import (
    EraserSettings,
    Ledger,
    PreparationMismatchError,
    Removal,
    ResponseEdit,
    UnknownExampleError,
    WholeDatasetError,
    llmeraser,
    load_preparation,
    prepare_llmeraser,
    save_preparation,
)

RTOL = 1e-5
NUM_EXAMPLES = 9
FORGET = ["example-2", "example-5", "example-7"]


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def _exact(**changes) -> EraserSettings:
    """CG run to convergence on the whole training set: the update is the exact solve."""
    settings = EraserSettings(
        solver="cg",
        sample_size=NUM_EXAMPLES,
        batch_size=4,
        max_steps=400,
        tol=1e-11,
        damping=0.05,
    )
    return dataclasses.replace(settings, **changes)


def _lora_flat(model, dense):
    return dense.to_flat(curvature.split_for_curvature(model)[1])


def _removal_reference(
    model, data, curvature_kind, damping, mode="influence", *, l2=0.0, leave_out=False
):
    """The update from dense matrices: the curvature over every example (or, with `leave_out`,
    over the retained ones), shifted by the penalty's μ and the damping λ."""
    dense = DenseObjective(model, data)
    forget = [data.index_of(i) for i in FORGET]
    retained = [i for i in range(len(data)) if i not in forget]
    curved = DenseObjective(model, data, retained) if leave_out else dense
    matrix = curved.hessian() if curvature_kind == "hessian" else curved.gauss_newton()
    forget_sum = len(forget) * DenseObjective(model, data, forget).gradient()
    n = len(data)
    system = matrix + (l2 + damping) * np.eye(matrix.shape[0])
    if mode == "influence":
        return dense, np.linalg.solve(system, forget_sum / n)
    full_sum = n * dense.gradient()
    after = (full_sum - forget_sum) / (n - len(forget)) + l2 * dense.flat
    return dense, -np.linalg.solve(system, after)


@pytest.mark.parametrize(
    ("curvature_kind", "mode"),
    [("hessian", "influence"), ("gauss_newton", "influence"), ("gauss_newton", "newton")],
)
def test_removal_update_equals_the_dense_solve(curvature_kind, mode):
    model = tiny_lora_model(seed=0, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES)
    # The Hessian here is indefinite; the damping keeps H + λI positive definite.
    damping = 1.0 if curvature_kind == "hessian" else 0.05
    dense, reference = _removal_reference(model, data, curvature_kind, damping, mode)
    before = _lora_flat(model, dense)
    settings = _exact(curvature=curvature_kind, mode=mode, damping=damping)
    result = llmeraser(model, Removal(FORGET), examples=examples, data=data, settings=settings)
    assert result.applied
    assert int(result.solution.status) == kernels.Status.CONVERGED
    update = dense.to_flat(result.update)
    np.testing.assert_allclose(update, reference, rtol=0, atol=RTOL * np.abs(reference).max())
    # Θ_new − Θ̂ is the update up to the rounding of one addition.
    np.testing.assert_allclose(_lora_flat(model, dense) - before, update, rtol=1e-9, atol=1e-15)
    assert result.update_norm == pytest.approx(np.linalg.norm(reference), rel=RTOL)


@pytest.mark.parametrize(
    ("mode", "l2", "damping", "leave_out"),
    [
        ("newton", 0.3, 0.0, False),
        ("influence", 0.3, 0.02, True),
        ("newton", 0.3, 0.0, True),
    ],
)
def test_penalty_and_left_out_curvature_match_the_dense_solve(mode, l2, damping, leave_out):
    """μ joins the curvature and the Newton gradient; leave_out_request drops the request's
    examples from the curvature."""
    model = tiny_lora_model(seed=2, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES, seed=2)
    dense, reference = _removal_reference(
        model, data, "gauss_newton", damping, mode, l2=l2, leave_out=leave_out
    )
    settings = _exact(mode=mode, damping=damping, l2_regularization=l2, leave_out_request=leave_out)
    result = llmeraser(model, Removal(FORGET), examples=examples, data=data, settings=settings)
    assert int(result.solution.status) == kernels.Status.CONVERGED
    update = dense.to_flat(result.update)
    np.testing.assert_allclose(update, reference, rtol=0, atol=RTOL * np.abs(reference).max())
    # Each ingredient changes the answer by far more than the tolerance.
    _, without = _removal_reference(model, data, "gauss_newton", damping + l2, mode)
    assert np.abs(without - reference).max() > 100 * RTOL * np.abs(reference).max()


def test_removal_raises_the_forget_loss():
    """The sign: the update undoes the removed examples' pull, so their loss goes up."""
    model = tiny_lora_model(seed=1, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES, seed=1)
    forget = [data.index_of(i) for i in FORGET]
    dense_forget = DenseObjective(model, data, forget)
    before = float(dense_forget.loss(dense_forget.flat))
    llmeraser(
        model,
        Removal(FORGET),
        examples=examples,
        data=data,
        settings=_exact(curvature="gauss_newton", damping=0.5),
    )
    after = float(DenseObjective(model, data, forget).loss(DenseObjective(model, data).flat))
    assert after > before


def test_response_edit_subtracts_the_edited_gradient(tiny_tokenizer_data):
    model, examples, data, tokenizer = tiny_tokenizer_data
    edited_id = examples[1].id
    new_response = " a corrected answer"
    dense = DenseObjective(model, data)
    matrix = dense.gauss_newton() + 0.05 * np.eye(dense.flat.size)
    original_gradient = DenseObjective(model, data, [1]).gradient()
    edited = [dataclasses.replace(examples[1], response=new_response)]
    from jaxunlearn.data import tokenize_examples

    edited_data = tokenize_examples(
        edited, tokenizer, max_length=data.max_length, buckets=data.buckets
    )
    edited_gradient = DenseObjective(model, edited_data).gradient()
    reference = np.linalg.solve(matrix, (original_gradient - edited_gradient) / len(data))
    result = llmeraser(
        model,
        ResponseEdit({edited_id: new_response}),
        examples=examples,
        data=data,
        tokenizer=tokenizer,
        settings=_exact(curvature="gauss_newton", sample_size=len(data)),
    )
    update = dense.to_flat(result.update)
    np.testing.assert_allclose(update, reference, rtol=0, atol=RTOL * np.abs(reference).max())


@pytest.mark.parametrize("solver", ["lowrank", "lissa", "sgd"])
def test_other_solvers_approach_the_exact_update(solver):
    model = tiny_lora_model(seed=0, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES)
    damping = 0.05
    dense, reference = _removal_reference(model, data, "gauss_newton", damping)
    dimension = dense.flat.size
    settings = _exact(
        solver=solver,
        curvature="gauss_newton",
        damping=damping,
        # lowrank: a full Krylov basis is exact; lissa/sgd: mini-batches of the whole set.
        rank=dimension,
        batch_size=NUM_EXAMPLES,
        max_steps=3000,
        learning_rate=0.5,
    )
    result = llmeraser(model, Removal(FORGET), examples=examples, data=data, settings=settings)
    error = np.linalg.norm(dense.to_flat(result.update) - reference) / np.linalg.norm(reference)
    tolerance = {"lowrank": 1e-4, "lissa": 1e-3, "sgd": 1e-4}[solver]
    assert error <= tolerance


def test_preparation_is_reused_and_survives_a_save(tmp_path):
    model = tiny_lora_model(seed=0, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES)
    settings = _exact(
        curvature="gauss_newton",
        solver="lowrank",
        rank=20,
        mode="newton",
        damping=None,
        relative_damping=0.1,
    )
    preparation = prepare_llmeraser(model, data, settings=settings)
    assert preparation.damping == pytest.approx(
        0.1 * preparation.spectrum.largest + max(0.0, -preparation.spectrum.smallest)
    )
    save_preparation(preparation, tmp_path / "prep")
    loaded = load_preparation(tmp_path / "prep", model)
    assert loaded.damping == preparation.damping
    assert loaded.adapter_digest == preparation.adapter_digest
    first = llmeraser(
        tiny_lora_model(seed=0, dtype=jnp.float64),
        Removal(FORGET),
        examples=examples,
        data=data,
        settings=settings,
        preparation=preparation,
    )
    second = llmeraser(
        tiny_lora_model(seed=0, dtype=jnp.float64),
        Removal(FORGET),
        examples=examples,
        data=data,
        settings=settings,
        preparation=loaded,
    )
    assert first.prepare_seconds == 0.0
    for a, b in zip(jax.tree.leaves(first.update), jax.tree.leaves(second.update), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-12)

    other_examples, other_data = random_examples(NUM_EXAMPLES + 1, seed=3)
    with pytest.raises(PreparationMismatchError, match="another training set"):
        llmeraser(
            tiny_lora_model(seed=0, dtype=jnp.float64),
            Removal(FORGET),
            examples=other_examples,
            data=other_data,
            settings=settings,
            preparation=loaded,
        )


def test_request_rules_and_the_ledger(tmp_path):
    model = tiny_lora_model(seed=0)
    examples, data = random_examples(NUM_EXAMPLES)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    settings = _exact(curvature="gauss_newton", max_steps=50, tol=1e-6)

    with pytest.raises(UnknownExampleError, match="no-such-id"):
        llmeraser(model, Removal(["no-such-id"]), examples=examples, data=data, ledger=ledger)
    with pytest.raises(WholeDatasetError):
        llmeraser(model, Removal(data.ids), examples=examples, data=data, ledger=ledger)

    result = llmeraser(
        model, Removal(FORGET), examples=examples, data=data, settings=settings, ledger=ledger
    )
    assert result.applied
    ledger.record(
        result.resolved, method="llmeraser", settings={}, adapter="out/1", figures=result.figures()
    )
    after_first = jax.tree.map(np.asarray, curvature.split_for_curvature(model)[1])

    repeated = llmeraser(
        model,
        Removal(reversed(FORGET)),
        examples=examples,
        data=data,
        settings=settings,
        ledger=ledger,
    )
    assert not repeated.applied
    assert "already applied" in repeated.message
    assert repeated.previous.adapter == "out/1"
    unchanged = curvature.split_for_curvature(model)[1]
    for a, b in zip(jax.tree.leaves(after_first), jax.tree.leaves(unchanged), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_a_failed_solve_raises_and_leaves_the_adapter_unchanged():
    model = tiny_lora_model(seed=0)
    examples, data = random_examples(NUM_EXAMPLES)
    before = jax.tree.map(np.asarray, curvature.split_for_curvature(model)[1])
    # The Hessian is indefinite here (test_curvature.py): tiny damping lets CG meet negative
    # curvature.
    settings = _exact(curvature="hessian", damping=1e-6)
    with pytest.raises(kernels.SolverError, match="INDEFINITE"):
        llmeraser(model, Removal(FORGET), examples=examples, data=data, settings=settings)
    after = curvature.split_for_curvature(model)[1]
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="solver"):
        EraserSettings(solver="newton-schulz")
    with pytest.raises(ValueError, match="mode"):
        EraserSettings(mode="exact")
    with pytest.raises(ValueError, match="damping"):
        EraserSettings(damping=-1.0)
    with pytest.raises(ValueError, match="rank"):
        EraserSettings(rank=0)
    with pytest.raises(ValueError, match="l2_regularization"):
        EraserSettings(l2_regularization=-1e-3)
    with pytest.raises(ValueError, match="damping 0 needs l2_regularization"):
        EraserSettings(damping=0.0)
    with pytest.raises(ValueError, match="leave_out_request needs"):
        EraserSettings(solver="lowrank", leave_out_request=True)
    assert EraserSettings(damping=0.0, l2_regularization=1e-2).damping == 0.0


def test_an_edit_needs_the_tokenizer():
    model = tiny_lora_model(seed=0)
    examples, data = random_examples(NUM_EXAMPLES)
    with pytest.raises(ValueError, match="tokenizer"):
        llmeraser(model, ResponseEdit({"example-1": " new"}), examples=examples, data=data)


def test_data_must_match_the_examples():
    model = tiny_lora_model(seed=0)
    examples, data = random_examples(NUM_EXAMPLES)
    shuffled = [examples[1], examples[0], *examples[2:]]
    with pytest.raises(ValueError, match="same order"):
        llmeraser(model, Removal(FORGET), examples=shuffled, data=data)


@pytest.fixture(scope="module")
def tiny_tokenizer_data(tmp_path_factory):
    """A tiny model with a real BPE tokenizer, for edits (their new text must be tokenized)."""
    from unlearn_fixtures import CONFIG

    from jaxunlearn.data import tokenize_examples, train_bpe_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    texts = [f"Question {i}: what is {i} plus {i}? The answer is {2 * i}." for i in range(40)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300, out_dir=directory)
    examples = [
        Example(f"qa-{i}", f"Question {i}: what is {i} plus {i}?", f" The answer is {2 * i}.")
        for i in range(6)
    ]
    with jax.enable_x64(True):
        config = dataclasses.replace(CONFIG, vocab_size=len(tokenizer))
        model = _tiny_model_with(config)
    data = tokenize_examples(examples, tokenizer, max_length=48, buckets=(16, 32, 48))
    return model, examples, data, tokenizer


def _tiny_model_with(config):
    from flax import nnx

    from jaxunlearn.models import add_lora, from_config

    model = add_lora(
        from_config(config, key=jax.random.key(0), dtype=jnp.float64),
        rank=1,
        alpha=4.0,
        targets=("q_proj", "v_proj"),
        key=jax.random.key(1),
    )
    lora = nnx.state(model, nnx.LoRAParam)
    leaves, structure = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    nnx.update(
        model,
        jax.tree.unflatten(
            structure,
            [
                0.5 * jax.random.normal(k, leaf.shape, jnp.float64)
                for k, leaf in zip(keys, leaves, strict=True)
            ],
        ),
    )
    return model
