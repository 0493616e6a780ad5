"""The paper's PPO baseline: critic initialised from the reward model, lambda 0.95 for both
actor and critic, no value pretraining.

Run (CPU)::

    python -m vcppo_jax.main --config=configs/ppo.py:tiny --workdir=/tmp/ppo_tiny
"""

from configs import common


def get_config(arg: str | None = None):
    c = common.apply_variant(common.base_config(), common.parse_arg(arg))
    c.experiment = "ppo"
    c.gae.lambda_actor = 0.95
    c.gae.lambda_critic = 0.95
    c.critic.init = "reward_model"
    if c.model.hf_path:
        # A reward model is trained here on the synthetic task only (loading a separately
        # trained one is not supported), so with a pretrained policy the critic starts from
        # the policy's backbone with a fresh value head.
        c.critic.init = "policy"
    return c
