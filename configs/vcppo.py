"""VC-PPO: value pretraining + decoupled GAE (lambda_critic = 1.0, lambda_actor = 0.95).

Run (CPU)::

    python -m vcppo_jax.main --config=configs/vcppo.py:tiny --workdir=/tmp/vcppo_tiny

Variants (after the colon): ``smoke`` (seconds, for tests), ``tiny`` (laptop CPU),
``small`` (one GPU), ``qwen2.5-32b`` (the paper's setting on a pod: 8K context,
``--config.model.hf_path`` must point at a long-CoT SFT checkpoint). Ablate from the command
line, e.g. ``--config.gae.lambda_actor=0.99`` or ``--config.gae.length_adaptive_alpha=0.05``.
"""

from configs import common


def get_config(arg: str | None = None):
    c = common.apply_variant(common.base_config(), common.parse_arg(arg))
    c.experiment = "vcppo"
    c.gae.lambda_actor = 0.95
    c.gae.lambda_critic = 1.0
    c.critic.init = "value_pretrain"
    return c
