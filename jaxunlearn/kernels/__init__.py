"""jaxunlearn.kernels: curvature math over arbitrary JAX pytrees.

Curvature-vector products (Hessian, Gauss-Newton, empirical Fisher) with one signature,
`product(function(s), params, v, *args)` (the `linearize_*` forms: the same without `v`),
per-example gradients, tree algebra, and solvers for damped systems (C + λI) x = b: conjugate
gradients, LiSSA, a stochastic quadratic solver driven by any optax-style optimizer, and
Lanczos eigenpairs with the low-rank inverse they define. Everything works on dicts, tuples,
`nnx.State` or any other pytree, under `jax.jit`, and on sharded arrays; nothing is raveled.
Imports only jax: nothing else of jaxunlearn, whose root package imports nothing.
"""

from jaxunlearn.kernels._cg import CGState, cg, cg_solver
from jaxunlearn.kernels._lanczos import (
    Eigenpairs,
    LanczosState,
    lanczos,
    lanczos_iteration,
    lowrank_inverse,
)
from jaxunlearn.kernels._lissa import LissaState, lissa, lissa_solver
from jaxunlearn.kernels._products import (
    fisher_vp,
    gnvp,
    hvp,
    linearize_gnvp,
    linearize_hvp,
    per_example_grads,
)
from jaxunlearn.kernels._sgd_quadratic import (
    GradientTransformation,
    SGDQuadraticState,
    sgd_quadratic,
    sgd_quadratic_solver,
)
from jaxunlearn.kernels._solution import IterativeSolver, Solution, SolverError, Status, iterate
from jaxunlearn.kernels._tree import (
    tree_add_scaled,
    tree_norm,
    tree_random_normal_like,
    tree_scale,
    tree_sub,
    tree_vdot,
    tree_zeros_like,
)

__all__ = [
    "CGState",
    "Eigenpairs",
    "GradientTransformation",
    "IterativeSolver",
    "LanczosState",
    "LissaState",
    "SGDQuadraticState",
    "Solution",
    "SolverError",
    "Status",
    "cg",
    "cg_solver",
    "fisher_vp",
    "gnvp",
    "hvp",
    "iterate",
    "lanczos",
    "lanczos_iteration",
    "linearize_gnvp",
    "linearize_hvp",
    "lissa",
    "lissa_solver",
    "lowrank_inverse",
    "per_example_grads",
    "sgd_quadratic",
    "sgd_quadratic_solver",
    "tree_add_scaled",
    "tree_norm",
    "tree_random_normal_like",
    "tree_scale",
    "tree_sub",
    "tree_vdot",
    "tree_zeros_like",
]
