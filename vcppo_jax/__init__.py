"""vcppo_jax: Value-Calibrated PPO for long chain-of-thought RL, in JAX."""

__version__ = "0.1.0"
