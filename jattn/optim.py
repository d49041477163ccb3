"""Learning-rate schedules as optax schedules."""

from __future__ import annotations

import jax.numpy as jnp
import optax

__all__ = ["noam_schedule"]


def noam_schedule(d_model: int, warmup_steps: int = 4000, *, scale: float = 1.0) -> optax.Schedule:
    """The warm-up schedule of "Attention Is All You Need" (§5.3), named after Noam Shazeer.

    ``lr(step) = scale · d_model^-0.5 · min(step^-0.5, step · warmup_steps^-1.5)``: a linear
    rise for ``warmup_steps`` steps, then decay with the inverse square root of the step, the
    peak being ``scale · (d_model · warmup_steps)^-0.5`` at ``step == warmup_steps``.

    Optax counts updates from 0 while the formula counts from 1 and is 0 or undefined at 0, so
    step 0 is given the learning rate of step 1: the first update moves, and there is no inf or
    NaN. For every ``step >= 1`` the value is the formula's.

    Use with e.g. ``optax.adam(noam_schedule(512), b1=0.9, b2=0.98, eps=1e-9)`` (the paper's
    Adam settings).

    Examples:
      >>> from jattn.optim import noam_schedule
      >>> lr = noam_schedule(d_model=512, warmup_steps=4000)
      >>> round(float(lr(4000)), 7)  # the peak, (512 * 4000) ** -0.5
      0.0006988
      >>> bool(lr(1000) < lr(4000) > lr(16000)), float(lr(0)) == float(lr(1))
      (True, True)
    """
    if d_model < 1 or warmup_steps < 1:
        raise ValueError(
            f"d_model and warmup_steps must be positive, got {d_model=}, {warmup_steps=}"
        )

    def schedule(count: jnp.ndarray) -> jnp.ndarray:
        step = jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
        return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

    return schedule
