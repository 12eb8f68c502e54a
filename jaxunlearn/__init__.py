"""jaxunlearn: machine unlearning for LoRA-adapted language models, in JAX/Flax."""

# This module imports nothing: `jaxunlearn.kernels` promises to load only jax, and importing it
# runs this file first.
__version__ = "0.1.0"

__all__ = ["__version__"]
