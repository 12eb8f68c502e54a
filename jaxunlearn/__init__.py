"""jaxunlearn: machine unlearning for LoRA-adapted language models, in JAX/Flax."""

__version__ = "0.1.0"

__all__ = ["__version__"]
