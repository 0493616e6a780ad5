"""Fields shared by every experiment config, and the named size variants.

Each config file builds on ``base_config()`` and picks a size with ``apply_variant``. Every field
can be overridden from the command line, e.g. ``--config.gae.lambda_actor=0.99``.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from vcppo_jax import sharding

VARIANTS = ("smoke", "tiny", "long", "small", "qwen2.5-32b")


def parse_arg(arg: str | None, default: str = "tiny") -> str:
    """``configs/x.py:tiny`` -> ``"tiny"``; an unknown variant names the ones there are."""
    variant = arg or default
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; expected one of {VARIANTS}")
    return variant


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.variant = ""

    # Policy / critic model (architectures and loading: vcppo_jax.models). The vocabulary comes
    # from the tokenizer (synthetic task) or from the checkpoint (model.hf_path).
    c.model = ml_collections.ConfigDict()
    c.model.hf_path = config_dict.placeholder(str)  # A HF Llama/Qwen2 directory, or None.
    c.model.hidden_size = 64
    c.model.num_layers = 3
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.intermediate_size = 256
    # Rotary base (synthetic-task models; a HF checkpoint brings its own). Larger = slower
    # rotation, so attention can match content across longer distances.
    c.model.rope_theta = 10000.0
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"
    c.model.remat = "none"
    # Attention of training, prompt and decode passes (vcppo_jax/models/attention.py): "xla" (scores
    # materialised: fastest at these CPU lengths, and the committed results' numerics),
    # "blockwise" (memory linear in length, any backend), "cudnn" (GPU flash kernel) or "auto"
    # (cudnn on a GPU for bfloat16, else blockwise; the choice is in config.json's "resolved").
    c.model.attention = "xla"
    # What the value models (reward model and critic) read: "hidden" (a linear head on the
    # last hidden state, as the paper's reward model and critic) or "hidden+likelihood" (also
    # a learned weight times the model's own log-likelihood of the token just read: a named
    # departure, for a reward model that has to find one slipped digit in a long answer;
    # README, "The long regime"). Value models of either kind start from the policy's weights.
    c.model.value_inputs = "hidden"
    # The embedding table is larger than the tokenizer (rounded up to a multiple of 8, or a HF
    # checkpoint's padding). True: the ids past the tokenizer get no probability anywhere, in
    # training as in sampling (ModelConfig.vocab_limit). False: the trainer's softmax runs over
    # the whole table while the sampler never draws those ids, as every run archived before
    # this field existed was made (experiments/archive.py; README, "Sampler").
    c.model.mask_unused_vocab = True

    # Data: the synthetic long chain-of-thought task (vcppo_jax/data/synthetic.py).
    c.data = ml_collections.ConfigDict()
    c.data.task = "addition"
    c.data.num_terms = 5  # Chain length: partial sums written in a full solution.
    c.data.digits = 2  # Difficulty of each step.
    # Name each term with a letter and start each written step by copying its named term
    # ("c7:8+7=15"; at most 52 terms): the next term is then found by name, which is what lets
    # a small model learn chains of 30 terms (the `long` variant). See data/synthetic.py.
    c.data.labels = False
    # With labels, > 0: every carry_every-th written step also restates the terms still to add
    # after "|" ("b5:3+5=8 | c7 d2 ;"), so a term is found by name within the last few steps,
    # never 250+ tokens back in the prompt. 0 = never. See data/synthetic.py.
    c.data.carry_every = 0
    c.data.direct_fraction = 0.3  # Share of SFT demonstrations that take the short route.
    c.data.tokenizer_vocab_size = 48
    # Demonstration batches (SFT, reward model) are padded to a multiple of this many tokens,
    # so that long answers of varying length do not compile a new step for every batch.
    c.data.pad_multiple = 1
    # data.task = "math": a real prompt set with model.hf_path (its tokenizer.json is used).
    c.data.train_files = ""  # Comma-separated .jsonl / .parquet files of {problem, answer}.
    c.data.eval_files = ""  # Held-out set; default: the training files.
    c.data.tfds_dir = config_dict.placeholder(str)  # Default: WORKDIR/tfds.
    c.data.prompt_template = (
        "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}."
    )

    # Supervised fine-tuning of the policy (skipped when model.hf_path is set).
    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 300
    c.sft.batch_size = 64
    c.sft.learning_rate = 1e-3
    # > 0: demonstrations of chains of min_terms..data.num_terms terms (uniform), the same
    # steps for less compute per example; 0 = every demonstration at data.num_terms.
    c.sft.min_terms = 0
    # Start from another run's SFT policy instead of training one: that run's workdir (or its
    # ``sft_policy`` export). Its seed, model and task settings must equal this config's. The
    # study driver trains one SFT policy per seed and starts every method from it.
    c.sft.init_from = ""

    # Reward model (the critic's initialisation in the paper's failing baseline): a value-head
    # model trained on balanced right / wrong responses, scored at the last token only.
    c.reward_model = ml_collections.ConfigDict()
    c.reward_model.steps = 600  # Tiny: ~85% held-out sign accuracy on full answers.
    c.reward_model.batch_size = 64
    c.reward_model.learning_rate = 1e-3
    # Held-out separation of right from wrong answers (rm/heldout_accuracy*): every this many
    # steps (0 = only after the last) on this many problems never trained on, 4 answers each.
    c.reward_model.eval_every = 50
    c.reward_model.eval_problems = 64
    # > 0: reward-model training chains of min_terms..data.num_terms terms (uniform), as
    # sft.min_terms does for demonstrations; the held-out set stays at data.num_terms.
    c.reward_model.min_terms = 0
    # "same_problem": each training problem answered right and wrong on one route, so the two
    # answers differ only from the slip on; "independent": every response its own problem.
    c.reward_model.pairs = "independent"
    # Share of the reward model's training pairs on the direct (short) route; None = as the
    # SFT demonstrations (data.direct_fraction). The held-out report covers both routes
    # whatever it is (1.0 probes whether a reward model can verify bare answers at all).
    c.reward_model.direct_fraction = config_dict.placeholder(float)
    # "last_token": the score at EOS regressed on the +1 / -1 outcome (as reward models are
    # usually trained); "every_token": every response token's score regressed on it (a
    # token-level verifier objective); "process": every token's score regressed on whether the
    # response is still right up to it (wrong from its first slip on); "first_slip": those
    # targets up to and including the slip, none after it (step labels stop at the first
    # wrong step); "min": the lowest token score over the response regressed on the outcome
    # (the outcome objective of a reward model read by score="min"). reward_model.score says
    # how a response's score is read.
    c.reward_model.loss_on = "last_token"
    # How a response's score is read from its tokens' scores: "last_token" (at EOS) or "min"
    # (the lowest over the response, as process reward models aggregate steps). The held-out
    # metrics are logged for both; rm/heldout_accuracy follows this field.
    c.reward_model.score = "last_token"
    # "policy": the SFT policy's backbone with a fresh value head (how reward models are usually
    # initialised); "random".
    c.reward_model.init = "policy"
    # A trained reward model to start from instead of training one (rm_export.py): the
    # workdir of a run whose reward_model stage finished, or its reward_model_export/; refused
    # unless it was trained under this run's seed, SFT, model and reward_model.* settings. The
    # study trains one per seed and every method that needs one reads it; the run then logs
    # the export's rows and goes on exactly as if it had trained the model itself.
    c.reward_model.init_from = ""

    # Rollouts.
    c.rollout = ml_collections.ConfigDict()
    c.rollout.prompts_per_step = 32
    c.rollout.samples_per_prompt = 1  # Group size n; GRPO and dynamic sampling need n > 1.
    c.rollout.max_new_tokens = 128
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0  # 0 = off.
    c.rollout.dynamic_sampling = False  # DAPO: drop groups that are all right or all wrong.

    # Rewards: +1 correct, -1 incorrect on the last response token.
    c.reward = ml_collections.ConfigDict()
    c.reward.correct = 1.0
    c.reward.incorrect = -1.0
    c.reward.overlong_buffer = 0  # DAPO soft overlong penalty window in tokens; 0 = off.
    c.reward.overlong_penalty = 1.0
    c.reward.format_penalty = 0.0  # Subtracted when no answer can be extracted.
    c.reward.verifier_workers = 2  # math-verify worker processes (data.task = "math").
    c.reward.verifier_timeout_s = 5.0  # Per answer; a hang scores as incorrect and is counted.

    # How advantages are estimated: "gae" (the critic and the lambdas below) or "grpo"
    # (group-normalised rewards, no critic; needs rollout.samples_per_prompt > 1).
    c.advantage = ml_collections.ConfigDict()
    c.advantage.estimator = "gae"

    # Decoupled GAE (VC-PPO section 4.2) and VAPO's length-adaptive actor lambda.
    c.gae = ml_collections.ConfigDict()
    c.gae.gamma = 1.0
    c.gae.lambda_actor = 0.95
    c.gae.lambda_critic = 1.0
    c.gae.length_adaptive_alpha = config_dict.placeholder(float)  # VAPO: 0.05; None = off.
    c.gae.whiten_advantages = True

    # PPO.
    c.ppo = ml_collections.ConfigDict()
    c.ppo.eps_low = 0.2
    c.ppo.eps_high = 0.2  # DAPO clip-higher: 0.28.
    c.ppo.dual_clip = config_dict.placeholder(float)  # e.g. 3.0; None = off.
    c.ppo.loss_agg_mode = "token-mean"
    c.ppo.value_clip = config_dict.placeholder(float)  # e.g. 0.2; None = unclipped.
    c.ppo.entropy_coef = 0.0
    c.ppo.kl_coef = 0.0  # KL-to-reference loss weight; 0 = no reference model.
    c.ppo.kl_estimator = "k3"
    c.ppo.positive_nll_coef = 0.0  # VAPO mu: 0.1.
    c.ppo.epochs = 1
    c.ppo.minibatches = 4
    c.ppo.steps = 100

    # Optimisers.
    c.actor = ml_collections.ConfigDict()
    c.actor.learning_rate = 1e-6
    c.actor.warmup_steps = 0
    c.actor.grad_clip = 1.0
    c.actor.weight_decay = 0.0
    c.critic = ml_collections.ConfigDict()
    c.critic.learning_rate = 2e-6
    c.critic.warmup_steps = 0
    c.critic.grad_clip = 1.0
    c.critic.weight_decay = 0.0
    # Where the critic starts: "reward_model" (the paper's failing baseline), "policy" (the
    # policy's backbone with a fresh value head) or "value_pretrain" (VC-PPO: the value
    # pretraining stage runs, starting from value_pretrain.init, and PPO's critic is its result).
    c.critic.init = "value_pretrain"
    # A controlled bias on unfinished prefixes, applied when the critic is first set up,
    # whatever it starts from (value pretraining, when on, starts from the biased critic):
    # "constant" adds init_offset to the value head's bias (every state); "linear" adds a
    # trainable per-token table, init_offset * (1 - t / rollout.max_new_tokens) on response
    # token t, so the under-valuing grows with the distance from the end of the answer.
    # 0 = the critic as it starts. Swept by experiments/collapse_map.py.
    c.critic.init_offset = 0.0
    c.critic.init_offset_profile = "constant"

    # Value pretraining (VC-PPO section 4.1; runs when critic.init = "value_pretrain"): fixed
    # policy, Monte Carlo targets (lambda = 1).
    c.value_pretrain = ml_collections.ConfigDict()
    c.value_pretrain.steps = 100
    c.value_pretrain.lambda_ = 1.0
    # Where value pretraining starts: "reward_model" (as in the paper: the reward model is
    # trained first), "policy" (the SFT policy's backbone, fresh value head) or "random".
    c.value_pretrain.init = "reward_model"
    # "plateau" (as the paper trains it, until value loss and explained variance converge):
    # stop once both stop improving (stages/value_pretrain.py), value_pretrain.steps the cap;
    # "steps": exactly value_pretrain.steps.
    c.value_pretrain.until = "plateau"
    c.value_pretrain.plateau_window = 10
    c.value_pretrain.plateau_tol = 0.01

    # Evaluation, logging, checkpoints.
    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 10
    c.eval.num_prompts = 128
    c.eval.num_samples = 4  # Sampled answers per prompt: sampled accuracy and pass@k.
    # Synthetic task: also the greedy accuracy of each route, forced by writing its first
    # tokens (eval/accuracy_greedy_{direct,written}_route): is writing the steps worth it?
    c.eval.route_accuracy = True
    c.log_every_steps = 1
    c.checkpoint_every_steps = 10
    # Stop (with a checkpoint) after this many steps in this invocation; None = run to the end.
    # For time-sliced jobs: start the same command again to continue.
    c.stop_after_steps = config_dict.placeholder(int)

    # Device mesh: axis sizes, -1 fills the remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Logical axis name -> mesh axes (None = replicated); see vcppo_jax/sharding.py.
    c.mesh.rules = sharding.DEFAULT_RULES
    c.distributed = False  # Call jax.distributed.initialize() (multi-host).
    return c


# Per-variant overrides of base_config(), "section.field" -> value: sizes only, the science
# fields (lambdas, critic start, value pretraining) are left to each config file.
VARIANT_OVERRIDES: dict[str, dict[str, object]] = {
    # Every stage for a few steps: the end-to-end tests.
    "smoke": {
        "model.hidden_size": 32,
        "model.num_layers": 2,
        "model.num_heads": 2,
        "model.num_kv_heads": 1,
        "model.intermediate_size": 64,
        "data.num_terms": 3,
        "data.digits": 1,
        "rollout.prompts_per_step": 8,
        "rollout.max_new_tokens": 32,
        "ppo.steps": 3,
        "ppo.minibatches": 2,
        "sft.steps": 6,
        "sft.batch_size": 16,
        "reward_model.steps": 3,
        "reward_model.batch_size": 16,
        "reward_model.eval_problems": 4,
        "value_pretrain.steps": 3,
        "eval.every_steps": 3,
        "eval.num_prompts": 8,
        "eval.num_samples": 2,
        "checkpoint_every_steps": 2,
        "actor.learning_rate": 1e-4,
        "critic.learning_rate": 1e-4,
    },
    # The CPU demo. Single-digit terms: a 3-layer model learns the written route in a few
    # hundred SFT steps (about 40% greedy accuracy), while the direct route stays hard.
    "tiny": {
        "data.num_terms": 5,
        "data.digits": 1,
        "sft.steps": 400,
        "sft.batch_size": 64,
        "sft.learning_rate": 3e-3,
        "rollout.prompts_per_step": 32,
        "rollout.max_new_tokens": 96,
        "ppo.steps": 60,
        "ppo.minibatches": 4,
        "value_pretrain.steps": 30,
        "eval.every_steps": 10,
        "eval.num_prompts": 128,
        "actor.learning_rate": 1e-4,
        "critic.learning_rate": 3e-4,
    },
    # The long-CoT regime on a CPU: ~310-token written answers. 14 labelled single-digit terms,
    # every step restating the terms still to add (data.carry_every=1), so each copy is from the
    # step before (a look-up 250+ tokens back is what the tiny model failed to learn: README,
    # "The long regime"): written solutions of 303-317 tokens, the direct answer 5-6, the prompt
    # ~31. SFT takes 2400 steps (~75 min on 2 cores at ~1.9 s/step; 1600 steps left seed 0 at
    # 40.6% greedy and seed 1 at 6.2%, 2400 took seed 0 to 87.5%: docs/results/long_regime/).
    # The reward model is trained 200 steps (not tiny's 600) to keep a run under 20 min.
    "long": {
        "data.num_terms": 14,
        "data.digits": 1,
        "data.labels": True,
        "data.carry_every": 1,
        "data.tokenizer_vocab_size": 96,
        "data.pad_multiple": 16,
        "sft.steps": 2400,
        "sft.batch_size": 32,
        "sft.learning_rate": 3e-3,
        "reward_model.steps": 200,
        "reward_model.batch_size": 32,
        "rollout.prompts_per_step": 16,
        "rollout.samples_per_prompt": 2,
        "rollout.max_new_tokens": 384,
        "ppo.steps": 30,
        "ppo.minibatches": 4,
        "value_pretrain.steps": 30,
        "eval.every_steps": 10,
        "eval.num_prompts": 64,
        "eval.num_samples": 2,
        "checkpoint_every_steps": 10,
        "actor.learning_rate": 1e-4,
        "critic.learning_rate": 3e-4,
    },
    # One GPU: the `tiny` task (5 single-digit terms, ~36-token answers) with a ~25M-parameter
    # model (8 layers, width 512). With 2-digit terms (the base default) SFT learns nothing in a few
    # hundred steps: 0% greedy after 300-400 steps at lr 1e-3 or 3e-3 (tiny model, CPU), and
    # the GPU run saw 0% after ~190 steps of this model. With 1-digit terms this
    # model's 300 SFT steps (float32, CPU) reached 46.1% greedy on 128 held-out prompts
    # (docs/results/small_cpu/). 128 new tokens leave ~3.5x the answers' length.
    "small": {
        "data.digits": 1,
        "model.hidden_size": 512,
        "model.num_layers": 8,
        "model.num_heads": 8,
        "model.num_kv_heads": 4,
        "model.intermediate_size": 1536,
        "model.dtype": "bfloat16",
        "model.attention": "auto",
        "rollout.prompts_per_step": 128,
        "rollout.samples_per_prompt": 4,
        "rollout.max_new_tokens": 128,
        "ppo.steps": 300,
        "ppo.minibatches": 8,
        "actor.learning_rate": 2e-5,
        "critic.learning_rate": 5e-5,
    },
    # The paper's setting on a pod (8K context). On GPUs, launch with XLA_FLAGS=
    # --xla_gpu_reduce_scatter_combine_threshold_bytes=8388608: with XLA's default combining of
    # the gradients' reduce-scatters, the compiled actor update holds ~4x the activations the
    # memory plan counts (README, "At scale").
    "qwen2.5-32b": {
        "model.hf_path": "/path/to/qwen2.5-32b-long-cot-sft",
        "model.param_dtype": "bfloat16",
        "model.dtype": "bfloat16",
        "model.remat": "full",
        "model.attention": "auto",
        "rollout.prompts_per_step": 512,
        "rollout.samples_per_prompt": 1,
        "rollout.max_new_tokens": 8192,
        "ppo.steps": 1000,
        "ppo.minibatches": 8,
        "actor.learning_rate": 1e-6,
        "critic.learning_rate": 2e-6,
        "value_pretrain.steps": 100,
        # Reward models are trained on the synthetic task only, so with math prompts value
        # pretraining starts from the policy (a departure from the paper at this scale).
        "value_pretrain.init": "policy",
        "mesh.data": -1,
        "mesh.fsdp": 16,
        "mesh.tensor": 4,
        "distributed": True,
    },
}
assert set(VARIANT_OVERRIDES) == set(VARIANTS)


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """Sizes for each named variant (``VARIANT_OVERRIDES``); the science fields are left alone."""
    c.variant = variant
    for path, value in VARIANT_OVERRIDES[variant].items():
        *parents, leaf = path.split(".")
        node = c
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"variant {variant!r}: no config field {path!r}")
        node[leaf] = value
    return c
