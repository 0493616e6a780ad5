"""Configs: every variant validates; each bad field gets an error naming it; CLI overrides."""

import copy
import json
import os
import subprocess
import sys

import pytest

from configs import common, ppo, vcppo
from vcppo_jax.config_validation import ConfigError, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", [vcppo, ppo])
@pytest.mark.parametrize("variant", common.VARIANTS)
def test_every_variant_is_valid(module, variant):
    c = module.get_config(variant)
    assert validate_config(c) is c
    assert c.variant == variant


def test_paper_settings():
    v, p = vcppo.get_config("tiny"), ppo.get_config("tiny")
    assert (v.gae.lambda_actor, v.gae.lambda_critic) == (0.95, 1.0)
    assert v.critic.init == "value_pretrain"
    assert (p.gae.lambda_actor, p.gae.lambda_critic) == (0.95, 0.95)
    assert p.critic.init == "reward_model"
    assert v.gae.gamma == 1.0 and v.ppo.eps_low == 0.2
    # Apart from the studied flags, the baseline and VC-PPO are the same experiment.
    a, b = v.to_dict(), p.to_dict()
    for d in (a, b):
        d.pop("experiment")
        d["gae"].pop("lambda_critic")
        d["critic"].pop("init")
    assert a == b


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown config variant 'huge'"):
        vcppo.get_config("huge")


BAD_FIELDS = [
    ("gae.lambda_actor", 1.5, "gae.lambda_actor=1.5: expected a number in [0, 1]"),
    ("gae.lambda_critic", -0.1, "gae.lambda_critic=-0.1"),
    ("gae.gamma", float("nan"), "gae.gamma=nan"),
    ("gae.length_adaptive_alpha", -0.05, "gae.length_adaptive_alpha=-0.05"),
    ("ppo.eps_high", 0.1, "ppo.eps_high=0.1: must be >= ppo.eps_low=0.2"),
    ("ppo.loss_agg_mode", "sum", "ppo.loss_agg_mode='sum': expected one of"),
    ("ppo.minibatches", 5, "ppo.minibatches=5: must divide the rollout batch"),
    ("ppo.dual_clip", 0.5, "ppo.dual_clip=0.5"),
    ("ppo.kl_estimator", "k9", "ppo.kl_estimator='k9'"),
    ("ppo.epochs", 0, "ppo.epochs=0: expected an integer >= 1"),
    ("reward_model.loss_on", "eos", "reward_model.loss_on='eos': expected one of"),
    ("reward_model.score", "mean", "reward_model.score='mean': expected one of"),
    ("reward_model.init_from", 3, "reward_model.init_from=3: expected a path or ''"),
    ("critic.init", "random", "critic.init='random'"),
    ("actor.learning_rate", 0.0, "actor.learning_rate=0.0"),
    ("rollout.top_p", 0.0, "rollout.top_p=0.0"),
    ("model.num_kv_heads", 3, "model.num_kv_heads=3: must divide model.num_heads=4"),
    ("mesh.data", 0, "mesh.data=0"),
    ("mesh.data", 4096, "mesh: mesh {'data': 4096, 'fsdp': 1, 'tensor': 1} needs 4096 devices"),
    ("data.carry_every", 2, "data.carry_every=2 needs data.labels=True"),
    ("reward_model.min_terms", 9, "reward_model.min_terms=9: expected 0 (off) or 2..data"),
    ("reward_model.min_terms", 1, "reward_model.min_terms=1: expected 0 (off) or 2..data"),
    ("data.carry_every", -1, "data.carry_every=-1: expected an integer >= 0"),
    ("mesh.rules", (("embed", "model"),), "mesh.rules: bad rule ('embed', 'model')"),
]


@pytest.mark.parametrize("path,value,message", BAD_FIELDS)
def test_each_bad_field_is_named(path, value, message):
    c = vcppo.get_config("tiny")
    node = c
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(ConfigError) as info:
        validate_config(c)
    assert message in str(info.value)
    assert len(info.value.problems) == 1, info.value.problems


def test_grpo_refuses_whitening_its_group_normalised_advantages_again():
    c = vcppo.get_config("tiny")
    c.advantage.estimator = "grpo"
    c.rollout.samples_per_prompt = 2
    with pytest.raises(ConfigError) as info:
        validate_config(c)
    assert info.value.problems == [info.value.problems[0]]
    assert "gae.whiten_advantages=True with advantage.estimator='grpo'" in str(info.value)
    c.gae.whiten_advantages = False
    validate_config(c)


def test_all_problems_reported_at_once():
    c = vcppo.get_config("tiny")
    c.gae.lambda_actor = 2.0
    c.ppo.eps_high = 0.1
    c.sft.min_terms = 9  # Above data.num_terms = 5.
    with pytest.raises(ConfigError) as info:
        validate_config(c)
    assert len(info.value.problems) == 3
    assert "sft.min_terms=9" in str(info.value)


def test_missing_field():
    c = copy.deepcopy(vcppo.get_config("tiny"))
    del c.gae["lambda_critic"]
    with pytest.raises(ConfigError, match="gae.lambda_critic: missing"):
        validate_config(c)


def run_main(*args):
    return subprocess.run(
        [sys.executable, "-m", "vcppo_jax.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_overrides_parse_validate_and_print():
    out = run_main(
        "--config=configs/vcppo.py:tiny",
        "--config.gae.lambda_actor=0.99",
        "--config.gae.length_adaptive_alpha=0.05",
        "--validate_only",
    )
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    assert resolved["gae"]["lambda_actor"] == 0.99
    assert resolved["gae"]["length_adaptive_alpha"] == 0.05
    assert resolved["variant"] == "tiny"


def test_cli_rejects_bad_value_with_field_name():
    out = run_main(
        "--config=configs/ppo.py:smoke", "--config.gae.lambda_actor=1.2", "--validate_only"
    )
    assert out.returncode == 2
    assert "gae.lambda_actor=1.2" in out.stderr


def test_reward_model_critic_with_a_pretrained_checkpoint_is_refused():
    c = ppo.get_config("tiny")  # critic.init = "reward_model".
    c.model.hf_path = "/some/model"
    with pytest.raises(ConfigError) as info:
        validate_config(c)
    assert info.value.problems == [
        "critic.init='reward_model': a reward model is trained on the synthetic task only; "
        "with model.hf_path choose 'policy'"
    ]
    c.critic.init = "policy"
    validate_config(c)


def test_unknown_override_is_one_line_naming_the_closest_fields():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "vcppo_jax.main", "--config=configs/vcppo.py:smoke",
         "--config.ppo.epoch=2", "--validate_only"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --config.ppo.epoch: no such config field; closest: ppo.epochs, ppo.eps_low, "
        "ppo.steps"
    ]


def test_small_trains_the_sft_recipe_its_committed_run_learned():
    """`small`'s task, model and SFT settings are those of the CPU run that measured its SFT
    policy at 46% greedy (docs/results/small_cpu/): a change to the recipe needs a new run."""
    ran = json.load(open(os.path.join(ROOT, "docs/results/small_cpu/sft_small_1digit_config.json")))
    c = vcppo.get_config("small").to_dict()
    for section, fields in {
        "data": ("task", "num_terms", "digits", "labels", "carry_every", "direct_fraction"),
        "model": ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"),
        "sft": ("steps", "batch_size", "learning_rate", "min_terms"),
    }.items():
        for f in fields:
            assert c[section][f] == ran[section][f], f"{section}.{f}"
    # The run differed only where the CPU needed it: float32 and materialised attention.
    assert (ran["model"]["dtype"], ran["model"]["attention"]) == ("float32", "xla")
    assert c["rollout"]["max_new_tokens"] == ran["rollout"]["max_new_tokens"] == 128


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config=configs/nope.py:tiny"], "no such config file 'configs/nope.py'"),
        (["--config=configs/vcppo.py:bogus"], "unknown config variant 'bogus'"),
        (
            ["--config=configs/vcppo.py:tiny", "--config.gae.lambda_actor=abc"],
            "--config.gae.lambda_actor=abc: could not convert",
        ),
        (["--config=configs/vcppo.py:tiny", "--config.seed=-1"], "seed=-1: expected an integer"),
    ],
)
def test_bad_config_files_and_values_end_in_one_error_line(args, message):
    out = run_main(*args, "--validate_only")
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr


def test_errors_a_user_can_act_on_are_one_line():
    import errno

    from vcppo_jax.main import user_error
    from vcppo_jax.metrics import MetricsFileError
    from vcppo_jax.models.hf import CheckpointError
    from vcppo_jax.tokenizer import TokenizerError

    for e in (CheckpointError("x"), TokenizerError("x"), MetricsFileError("x")):
        assert user_error(e) == "x"
    assert user_error(FileNotFoundError("sft.init_from='/a': no finished SFT policy")) == (
        "sft.init_from='/a': no finished SFT policy"
    )
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "/a/b")
    assert user_error(missing) == "/a/b: No such file or directory"
    assert user_error(RuntimeError("a bug")) is None
