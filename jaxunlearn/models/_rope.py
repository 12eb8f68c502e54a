"""Rotary position embeddings, with the frequency scalings transformers 5 supports for Llama."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.models._config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Returns the `head_dim // 2` rotary inverse frequencies, in float32.

    Computed with NumPy at trace time, so they are constants of the compiled program. The
    arithmetic follows transformers' `ROPE_INIT_FUNCTIONS` in float32.
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    if scaling.rope_type == "llama3":
        old_context = scaling.original_max_position_embeddings
        low_freq_wavelength = old_context / scaling.low_freq_factor
        high_freq_wavelength = old_context / scaling.high_freq_factor
        wavelength = 2 * math.pi / inv_freq
        scaled = np.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
        smooth = (old_context / wavelength - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"Unknown rope_type {scaling.rope_type!r}.")  # ModelConfig rejects it first.


def rotary_cos_sin(
    positions: jax.Array, config: ModelConfig, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """Returns cos and sin tables of shape [batch, length, head_dim] for integer `positions`."""
    inv_freq = jnp.asarray(inverse_frequencies(config))
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x` of shape [batch, length, heads, head_dim] by the angles of `cos`/`sin`.

    Uses the half-split layout of Hugging Face checkpoints (not the interleaved one of Meta's
    original weights, which the Hugging Face conversion permutes away).
    """
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
