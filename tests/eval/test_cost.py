"""Compiled FLOPs from XLA's cost analysis."""

import functools

import jax
import jax.numpy as jnp

from jaxunlearn.eval import compiled_flops


def _matmul(a, b):
    return a @ b


def test_square_matmul_counts_two_n_cubed():
    for n in (16, 32):
        a = jnp.ones((n, n), jnp.float32)
        assert compiled_flops(_matmul, a, a) == 2 * n**3


def test_jitted_functions_and_abstract_arguments():
    spec = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    assert compiled_flops(jax.jit(_matmul), spec, spec) == 2 * 32**3

    @functools.partial(jax.jit, static_argnames=("times",))
    def repeated(a, *, times):
        for _ in range(times):  # unrolled at trace time, so every matmul is counted
            a = a @ a
        return a

    assert compiled_flops(repeated, spec, times=3) == 3 * 2 * 32**3
