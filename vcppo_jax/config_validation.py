"""Checks an experiment config before anything runs.

``validate_config`` looks at every field it knows and raises one ``ConfigError`` that lists
each bad field with its value and what is allowed, so a user fixes all of them in one go. Each
config section has its own ``validate_<section>`` function; they share one ``Checker``, which
collects the problems.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections

from vcppo_jax.advantages import ESTIMATORS
from vcppo_jax.data.synthetic import LABELS
from vcppo_jax.losses import AGG_MODES, KL_ESTIMATORS
from vcppo_jax.models.attention import IMPLEMENTATIONS as ATTENTION
from vcppo_jax.models.config import VALUE_INPUTS
from vcppo_jax.sharding import MESH_AXES, ShardingError, mesh_shape
from vcppo_jax.stages.reward_model import LOSS_ON, PAIRS, SCORES

CRITIC_INITS = ("reward_model", "policy", "value_pretrain")
OFFSET_PROFILES = ("constant", "linear")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")


class ConfigError(ValueError):
    """A config field holds a value the experiment cannot run with."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid config ({len(problems)} problem(s)):\n{lines}")


_MISSING = object()


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
    node = config
    for key in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def number_in(lo: float, hi: float, *, lo_open=False, hi_open=False) -> Callable[[Any], bool]:
    """A check that accepts a finite number (not a bool) in ``[lo, hi]``, either end open on
    request."""

    def ok(x):
        if not _is_number(x):
            return False
        above = x > lo if lo_open else x >= lo
        below = x < hi if hi_open else x <= hi
        return above and below

    return ok


def one_of(options: Iterable[str]) -> tuple[Callable[[Any], bool], str]:
    """``(check, description)`` for a value among ``options``; unpacks into a ``Checker`` call."""
    options = tuple(options)
    return (lambda x: x in options), f"one of {options}"


def positive_int(x) -> bool:
    """True for an int (not a bool) >= 1."""
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def non_negative_int(x) -> bool:
    """True for an int (not a bool) >= 0."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def is_bool(x) -> bool:
    """True for True or False only."""
    return isinstance(x, bool)


non_negative = number_in(0.0, math.inf)
positive = number_in(0.0, math.inf, lo_open=True)
unit = number_in(0.0, 1.0)


class Checker:
    """Reads fields of one config and collects every problem found."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.problems: list[str] = []

    def get(self, path: str) -> Any:
        """The value at the dotted ``path``, or ``_MISSING`` if any part of the path is absent."""
        return _get(self.config, path)

    def problem(self, text: str) -> None:
        """Records one problem: a line of the eventual ``ConfigError``."""
        self.problems.append(text)

    def __call__(self, path: str, ok: Callable[[Any], bool], allowed: str, optional=False):
        """The field's value if ``ok`` accepts it (or it is an allowed None), else None and a
        problem naming the field, its value and ``allowed``."""
        value = self.get(path)
        if value is _MISSING:
            self.problem(f"{path}: missing (expected {allowed})")
            return None
        if optional and value is None:
            return None
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            self.problem(f"{path}={value!r}: expected {allowed}")
            return None
        return value


def validate_gae(check: Checker) -> None:
    """GAE gamma and lambdas, the length-adaptive alpha, the advantage estimator and whitening."""
    check("gae.gamma", unit, "a number in [0, 1]")
    check("gae.lambda_actor", unit, "a number in [0, 1]")
    check("gae.lambda_critic", unit, "a number in [0, 1]")
    check(
        "gae.length_adaptive_alpha",
        positive,
        "a positive number (VAPO uses 0.05) or None",
        optional=True,
    )
    estimator = check("advantage.estimator", *one_of(ESTIMATORS))
    whiten = check("gae.whiten_advantages", is_bool, "True or False")
    if estimator == "grpo" and whiten:
        check.problem(
            "gae.whiten_advantages=True with advantage.estimator='grpo': GRPO's advantages are "
            "already normalised within each group; whitened again over the batch's tokens, the "
            "mean subtracted is weighted by response length and can turn a correct answer's "
            "advantage negative. Set --config.gae.whiten_advantages=False"
        )


def validate_ppo(check: Checker) -> None:
    """The PPO clip range (``eps_high`` >= ``eps_low``), dual clip, loss aggregation, value clip,
    loss coefficients, KL estimator, epochs, minibatches and steps."""
    eps_low = check("ppo.eps_low", number_in(0.0, 1.0, lo_open=True, hi_open=True), "in (0, 1)")
    eps_high = check("ppo.eps_high", positive, "a positive number")
    if eps_low is not None and eps_high is not None and eps_high < eps_low:
        check.problem(
            f"ppo.eps_high={eps_high!r}: must be >= ppo.eps_low={eps_low!r} (clip-higher widens "
            "the upper bound only)"
        )
    check("ppo.dual_clip", number_in(1.0, math.inf, lo_open=True), "a number > 1 or None", True)
    check("ppo.loss_agg_mode", *one_of(AGG_MODES))
    check("ppo.value_clip", positive, "a positive number or None", optional=True)
    check("ppo.entropy_coef", non_negative, "a number >= 0")
    check("ppo.kl_coef", non_negative, "a number >= 0")
    check("ppo.kl_estimator", *one_of(KL_ESTIMATORS))
    check("ppo.positive_nll_coef", non_negative, "a number >= 0")
    check("ppo.epochs", positive_int, "an integer >= 1")
    check("ppo.minibatches", positive_int, "an integer >= 1")
    check("ppo.steps", non_negative_int, "an integer >= 0")


def validate_rollout(check: Checker) -> None:
    """The rollout batch (which ``ppo.minibatches`` must divide) and sampling settings; dynamic
    sampling and GRPO need at least 2 samples per prompt."""
    prompts = check("rollout.prompts_per_step", positive_int, "an integer >= 1")
    samples = check("rollout.samples_per_prompt", positive_int, "an integer >= 1")
    minibatches = check.get("ppo.minibatches")
    if prompts is not None and samples is not None and positive_int(minibatches):
        batch = prompts * samples
        if batch % minibatches:
            check.problem(
                f"ppo.minibatches={minibatches}: must divide the rollout batch "
                f"rollout.prompts_per_step * rollout.samples_per_prompt = {prompts} * {samples} "
                f"= {batch}"
            )
    check("rollout.max_new_tokens", positive_int, "an integer >= 1")
    check("rollout.temperature", number_in(0.0, math.inf), "a number >= 0 (0 = greedy)")
    check("rollout.top_p", number_in(0.0, 1.0, lo_open=True), "a number in (0, 1]")
    check("rollout.top_k", non_negative_int, "an integer >= 0 (0 = off)")
    dynamic = check("rollout.dynamic_sampling", is_bool, "True or False")
    if samples == 1 and (dynamic or check.get("advantage.estimator") == "grpo"):
        what = "rollout.dynamic_sampling" if dynamic else "advantage.estimator='grpo'"
        check.problem(
            f"rollout.samples_per_prompt=1: {what} needs groups of at least 2 samples per prompt"
        )


def validate_reward(check: Checker) -> None:
    """Correct / incorrect rewards, the overlong and format penalties, and the verifier pool."""
    check("reward.correct", _is_number, "a finite number")
    check("reward.incorrect", _is_number, "a finite number")
    check("reward.overlong_buffer", non_negative_int, "an integer >= 0 (0 = off)")
    check("reward.overlong_penalty", non_negative, "a number >= 0")
    check("reward.format_penalty", non_negative, "a number >= 0")
    check("reward.verifier_workers", positive_int, "an integer >= 1")
    check("reward.verifier_timeout_s", positive, "a positive number of seconds")


def validate_optimisers(check: Checker) -> None:
    """Learning rate, warm-up, gradient clip and weight decay of the actor and the critic."""
    for who in ("actor", "critic"):
        check(f"{who}.learning_rate", positive, "a positive number")
        check(f"{who}.warmup_steps", non_negative_int, "an integer >= 0")
        check(f"{who}.grad_clip", positive, "a positive number")
        check(f"{who}.weight_decay", non_negative, "a number >= 0")


def validate_critic(check: Checker) -> None:
    """Where the critic starts, and value pretraining; the two must agree."""
    init = check("critic.init", *one_of(CRITIC_INITS))
    check("critic.init_offset", _is_number, "a finite number (0 = no offset)")
    check("critic.init_offset_profile", *one_of(OFFSET_PROFILES))
    check("value_pretrain.steps", non_negative_int, "an integer >= 0")
    check("value_pretrain.lambda_", unit, "a number in [0, 1]")
    check("value_pretrain.init", *one_of(("policy", "reward_model", "random")))
    check("value_pretrain.until", *one_of(("steps", "plateau")))
    check("value_pretrain.plateau_window", positive_int, "an integer >= 1")
    check("value_pretrain.plateau_tol", non_negative, "a number >= 0")
    if check.get("model.hf_path"):
        for field in ("critic.init", "value_pretrain.init"):
            pretrained = init == "value_pretrain"
            if check.get(field) == "reward_model" and (field == "critic.init" or pretrained):
                check.problem(
                    f"{field}='reward_model': a reward model is trained on the synthetic task "
                    "only; with model.hf_path choose 'policy'"
                )


def validate_data(check: Checker) -> None:
    """The task and its prompts: the synthetic task's shape, or a real prompt set."""
    task = check("data.task", *one_of(("addition", "math")))
    if task == "math":
        if not check.get("model.hf_path"):
            check.problem("data.task='math': needs model.hf_path (a pretrained HF model dir)")
        if not check.get("data.train_files"):
            check.problem("data.task='math': needs data.train_files (.jsonl / .parquet files)")
    check(
        "data.prompt_template",
        lambda x: isinstance(x, str) and "{prompt}" in x,
        "a string containing '{prompt}'",
    )
    num_terms = check("data.num_terms", lambda x: positive_int(x) and x >= 2, "an integer >= 2")
    check("data.digits", lambda x: positive_int(x) and x <= 6, "an integer in [1, 6]")
    labels = check("data.labels", is_bool, "True or False")
    if labels is True and positive_int(num_terms) and num_terms > len(LABELS):
        check.problem(
            f"data.num_terms={num_terms}: at most {len(LABELS)} with data.labels=True "
            "(one letter per term)"
        )
    carry = check("data.carry_every", non_negative_int, "an integer >= 0 (0 = off)")
    if positive_int(carry) and labels is False:
        check.problem(
            f"data.carry_every={carry} needs data.labels=True (the restated terms are named)"
        )
    check("data.direct_fraction", unit, "a number in [0, 1]")
    check("data.tokenizer_vocab_size", lambda x: positive_int(x) and x >= 20, "an integer >= 20")
    check("data.pad_multiple", positive_int, "a positive integer")


def validate_supervised(check: Checker) -> None:
    """SFT and the reward model."""
    num_terms = check.get("data.num_terms")
    for stage in ("sft", "reward_model"):
        min_terms = check(f"{stage}.min_terms", non_negative_int, "an integer >= 0 (0 = off)")
        if positive_int(min_terms) and positive_int(num_terms) and not 2 <= min_terms <= num_terms:
            check.problem(f"{stage}.min_terms={min_terms}: expected 0 (off) or 2..data.num_terms")
        check(f"{stage}.steps", non_negative_int, "an integer >= 0")
        check(f"{stage}.batch_size", positive_int, "an integer >= 1")
        check(f"{stage}.learning_rate", positive, "a positive number")
    check("reward_model.init", *one_of(("policy", "random")))
    check("reward_model.eval_every", non_negative_int, "an integer >= 0 (0 = after the last step)")
    check("reward_model.eval_problems", positive_int, "an integer >= 1")
    pairs = check("reward_model.pairs", *one_of(PAIRS))
    check(
        "reward_model.direct_fraction",
        lambda x: x is None or unit(x),
        "a number in [0, 1], or None (as data.direct_fraction)",
    )
    check("reward_model.loss_on", *one_of(LOSS_ON))
    check("reward_model.score", *one_of(SCORES))
    rm_batch = check.get("reward_model.batch_size")
    if pairs == "same_problem" and positive_int(rm_batch) and rm_batch % 2:
        check.problem(
            f"reward_model.batch_size={rm_batch}: reward_model.pairs='same_problem' needs an "
            "even batch (a right and a wrong answer per problem)"
        )
    check("reward_model.init_from", lambda x: isinstance(x, str), "a path or ''")
    init_from = check("sft.init_from", lambda x: isinstance(x, str), "a path or ''")
    if init_from and check.get("data.task") != "addition":
        check.problem(
            f"sft.init_from={init_from!r}: only for data.task='addition' (a pretrained policy "
            "is given with model.hf_path)"
        )


def validate_model(check: Checker) -> None:
    """Model sizes (``num_kv_heads`` dividing ``num_heads``, ``num_heads`` dividing
    ``hidden_size``), rope theta, dtypes and rematerialisation."""
    for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        check(f"model.{field}", positive_int, "an integer >= 1")
    check("model.mask_unused_vocab", lambda x: isinstance(x, bool), "True or False")
    heads, kv = check.get("model.num_heads"), check.get("model.num_kv_heads")
    if positive_int(heads) and positive_int(kv) and heads % kv:
        check.problem(f"model.num_kv_heads={kv}: must divide model.num_heads={heads}")
    hidden = check.get("model.hidden_size")
    if positive_int(heads) and positive_int(hidden) and hidden % heads:
        check.problem(f"model.hidden_size={hidden}: must be divisible by model.num_heads={heads}")
    check("model.rope_theta", number_in(1.0, math.inf), "a number >= 1")
    check("model.param_dtype", *one_of(DTYPES))
    check("model.dtype", *one_of(DTYPES))
    check("model.remat", *one_of(REMAT))
    check("model.attention", *one_of(ATTENTION))
    check("model.value_inputs", *one_of(VALUE_INPUTS))


def validate_loop(check: Checker) -> None:
    """Seed, evaluation, logging and checkpoint cadence."""
    check(
        "seed",
        lambda x: isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32,
        "an integer in [0, 2**32)",
    )
    for field in ("eval.every_steps", "log_every_steps", "checkpoint_every_steps"):
        check(field, positive_int, "an integer >= 1")
    check("eval.num_prompts", positive_int, "an integer >= 1")
    check("eval.num_samples", positive_int, "an integer >= 1")
    check("eval.route_accuracy", is_bool, "True or False")
    check("stop_after_steps", positive_int, "an integer >= 1 or None", optional=True)


def validate_mesh(check: Checker) -> None:
    """Mesh axis sizes (at most one -1) and the logical-axis rules (each naming known mesh axes)."""
    mesh_sizes = []
    for axis in MESH_AXES:
        size = check(
            f"mesh.{axis}",
            lambda x: isinstance(x, int) and not isinstance(x, bool) and (x == -1 or x >= 1),
            "an integer >= 1, or -1 to fill the remaining devices",
        )
        mesh_sizes.append(size)
    if mesh_sizes.count(-1) > 1:
        check.problem(f"mesh: at most one axis may be -1; got {mesh_sizes}")
    elif None not in mesh_sizes and check.get("distributed") is False:
        # One process: the devices are all here, so the mesh can be checked now (a
        # multi-process run sees its devices only after jax.distributed.initialize).
        try:
            mesh_shape(dict(zip(MESH_AXES, mesh_sizes, strict=True)), jax.device_count())
        except ShardingError as e:
            check.problem(f"mesh: {e} (on {jax.default_backend()})")
    rules = check.get("mesh.rules")
    if rules is _MISSING:
        check.problem("mesh.rules: missing (expected (logical name, mesh axes) pairs)")
        return
    for rule in rules:
        ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
        axes = rule[1] if ok else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        if not ok or any(a not in MESH_AXES for a in axes):
            check.problem(
                f"mesh.rules: bad rule {rule!r}; expected (logical name, None | mesh axis | "
                f"tuple of mesh axes) with mesh axes from {MESH_AXES}"
            )


SECTIONS: tuple[Callable[[Checker], None], ...] = (
    validate_gae,
    validate_ppo,
    validate_rollout,
    validate_reward,
    validate_optimisers,
    validate_critic,
    validate_data,
    validate_supervised,
    validate_model,
    validate_loop,
    validate_mesh,
)


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Returns ``config`` unchanged if every known field is valid; else raises ``ConfigError``
    listing every problem found by every section's check."""
    check = Checker(config)
    for validate in SECTIONS:
        validate(check)
    if check.problems:
        raise ConfigError(check.problems)
    return config
