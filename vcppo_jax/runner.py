"""The experiment: stages, loop, checkpoints, metrics. The only module that reads the config and
the only one with Python loops over steps.

Stages, each switched by the config, in order:
  sft             supervised fine-tuning of the policy on task demonstrations
  reward_model    a value-head model trained on EOS scores of right / wrong responses
  value_pretrain  the critic regresses Monte Carlo returns of the fixed starting policy
  ppo             rollouts -> rewards -> decoupled GAE -> critic and actor updates, with
                  periodic evaluation on held-out prompts

Every stage's randomness is ``fold_in(seed, stage, step)`` and its data are a function of
``(seed, stage, step)``, so a run resumed from a checkpoint ends exactly like an uninterrupted
one.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from vcppo_jax import advantages as adv_lib
from vcppo_jax import metrics as metrics_lib
from vcppo_jax import rewards, rollout, sampling, sft_export, sharding, train_state, updates
from vcppo_jax.checkpoint import (
    SFT_KEYS,
    Checkpointer,
    fingerprint,
)
from vcppo_jax.config_validation import validate_config
from vcppo_jax.data.sources import EVAL_SEED_OFFSET, MathSource, SyntheticSource
from vcppo_jax.data.synthetic import AdditionTask, sft_examples
from vcppo_jax.metrics import MetricsWriter, Progress
from vcppo_jax.models import ModelConfig, hf
from vcppo_jax.tokenizer import check_vocab

STAGE_IDS = {"sft": 1, "reward_model": 2, "value_pretrain": 3, "ppo": 4}


def _mean_metrics(metrics: list[dict]) -> dict[str, float]:
    """Mean of each metric over the minibatch updates of one step."""
    return {k: float(np.mean([float(m[k]) for m in metrics])) for k in metrics[0]}


def _copy(tree):
    """A distinct copy: update steps donate their state, so no two states may share buffers."""
    return jax.tree.map(jnp.copy, tree)


FIRST_TOKENS = 5  # "First tokens" in the mechanism metrics: the length of a direct answer.


def mechanism_metrics(
    adv: np.ndarray,
    values: np.ndarray,
    rewards_: np.ndarray,
    mask: np.ndarray,
    lengths: np.ndarray,
    direct: np.ndarray,
) -> dict[str, float]:
    """The collapse condition of one PPO batch (host arrays, ``[B, T]`` response-aligned,
    advantages before whitening).

    With lambda < 1 a short answer's first token receives about lambda^T (R_short - V) of its
    terminal signal and a long answer's almost none, so early stopping pays only while the
    critic's value on unfinished prefixes lies below the mean reward of short answers:
    ``collapse_margin = reward_short - value_prefix_short`` > 0 pushes the policy towards
    short answers. Also the first tokens' advantage by route and by length quartile.
    """
    out: dict[str, float] = {}
    seq_reward = rewards_.sum(1)
    k = min(FIRST_TOKENS, adv.shape[1])
    first = mask[:, :k]
    adv_first = (adv[:, :k] * first).sum(1) / np.maximum(first.sum(1), 1)  # [B]
    val_prefix = (values * mask).sum(1) / np.maximum(mask.sum(1), 1)  # [B] mean over states
    val_first = (values[:, :k] * first).sum(1) / np.maximum(first.sum(1), 1)
    out["mechanism/value_first_tokens"] = float(val_first.mean())
    for route, sel in (("short", direct), ("long", ~direct)):
        if sel.any():
            out[f"mechanism/reward_{route}"] = float(seq_reward[sel].mean())
            out[f"mechanism/value_prefix_{route}"] = float(val_prefix[sel].mean())
            out[f"mechanism/advantage_first_tokens_{route}"] = float(adv_first[sel].mean())
    if direct.any():
        out["mechanism/collapse_margin"] = (
            out["mechanism/reward_short"] - out["mechanism/value_prefix_short"]
        )
    # Quartiles of response length within the batch (q1 = shortest quarter).
    order = np.argsort(lengths, kind="stable")
    for q, idx in enumerate(np.array_split(order, 4), start=1):
        if len(idx):
            out[f"mechanism/advantage_first_tokens_q{q}"] = float(adv_first[idx].mean())
            out[f"mechanism/length_q{q}"] = float(np.mean(lengths[idx]))
    return out


class Experiment:
    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = workdir
        self.mesh = sharding.make_mesh({a: config.mesh[a] for a in sharding.MESH_AXES})
        self.rules = tuple(tuple(r) for r in config.mesh.rules)
        self._batch_shards = int(
            np.prod([self.mesh.shape[a] for a in sharding.batch_axes(self.rules)])
        )
        self.task = AdditionTask(
            config.data.num_terms,
            config.data.digits,
            config.data.labels,
            config.data.carry_every,
        )
        self._sft_init = self._check_sft_init()
        self.source = self._source()
        self.tokenizer = self.source.tokenizer
        self.model_config = self._model_config()
        self.metrics = MetricsWriter(workdir, process_index=jax.process_index())
        self.checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
        self.stages = self._stages()
        self._stop_requested = False
        self.key = jax.random.key(config.seed)
        self.sampling_params = sampling.SamplingParams(
            max_new_tokens=config.rollout.max_new_tokens,
            temperature=config.rollout.temperature,
            top_p=config.rollout.top_p,
            top_k=config.rollout.top_k,
            eos_ids=(self.tokenizer.eos_id,),
            pad_id=self.tokenizer.pad_id,
            matmul=config.rollout.decode_matmul,
        )
        self.greedy_params = dataclasses.replace(self.sampling_params, temperature=0.0)
        self.actor_settings = updates.ActorSettings(
            eps_low=config.ppo.eps_low,
            eps_high=config.ppo.eps_high,
            dual_clip=config.ppo.dual_clip,
            agg_mode=config.ppo.loss_agg_mode,
            entropy_coef=config.ppo.entropy_coef,
            kl_coef=config.ppo.kl_coef,
            kl_estimator=config.ppo.kl_estimator,
            positive_nll_coef=config.ppo.positive_nll_coef,
            temperature=config.rollout.temperature or 1.0,
        )
        self._init_states()

    # ------------------------------------------------------------------------------------------
    # Set-up.
    # ------------------------------------------------------------------------------------------

    def _source(self):
        c = self.config
        if c.data.task == "addition":
            return SyntheticSource(self.task, self.workdir, c.seed, c.data.tokenizer_vocab_size)
        if not c.model.hf_path:
            raise ValueError("data.task='math' needs model.hf_path (a pretrained HF model)")
        split = lambda v: [f for f in (v or "").split(",") if f]
        return MathSource(
            train_files=split(c.data.train_files),
            eval_files=split(c.data.eval_files),
            tfds_dir=c.data.tfds_dir or os.path.join(self.workdir, "tfds"),
            tokenizer_path=c.model.hf_path,
            prompt_template=c.data.prompt_template,
            batch_size=c.rollout.prompts_per_step,
            seed=c.seed,
            verifier_workers=c.reward.verifier_workers,
            verifier_timeout_s=c.reward.verifier_timeout_s,
        )

    def _check_sft_init(self) -> str | None:
        """sft.init_from -> the export directory, after checking it was trained under this
        config's seed, model and task settings; its tokenizer is copied into this workdir."""
        src = self.config.sft.init_from
        if not src:
            return None
        path = sft_export.resolve(src, fingerprint(self.config, SFT_KEYS))
        if jax.process_index() == 0:
            mine = os.path.join(self.workdir, "tokenizer", "spm.model")
            sft_export.adopt_tokenizer(path, mine, src)
        return path

    def _export_sft_policy(self) -> None:
        """WORKDIR/sft_policy: the fine-tuned policy in HF format, its tokenizer and the
        settings it was trained under (what sft.init_from checks)."""
        params = jax.tree.map(self._host, self.states.sft.params)
        if jax.process_index() != 0:
            return
        tokenizer = ""
        if self.config.data.task == "addition":
            tokenizer = os.path.join(self.workdir, "tokenizer", "spm.model")
        fp = fingerprint(self.config, SFT_KEYS)
        sft_export.export(self.workdir, self.model_config, params, fp, tokenizer)

    def _model_config(self) -> ModelConfig:
        m = self.config.model
        if m.hf_path:
            self._hf_config, self._hf_params = hf.load_checkpoint(
                m.hf_path, param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat
            )
            check_vocab(self.tokenizer, self._hf_config)
            return self._hf_config
        vocab = int(np.ceil(self.tokenizer.vocab_size / 8) * 8)
        return ModelConfig(
            vocab_size=vocab,
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            param_dtype=m.param_dtype,
            dtype=m.dtype,
            remat=m.remat,
            rope_theta=float(m.rope_theta),
            max_position_embeddings=1024,
            bos_token_id=self.tokenizer.bos_id,
            eos_token_id=self.tokenizer.eos_id,
            pad_token_id=self.tokenizer.pad_id,
        )

    def _stages(self) -> list[str]:
        c = self.config
        stages = []
        # A pretrained policy or another run's SFT policy skips SFT.
        if c.sft.steps > 0 and not c.model.hf_path and not c.sft.init_from:
            stages.append("sft")
        vp = c.critic.init == "value_pretrain" and c.advantage.estimator == "gae"
        needs_rm = c.critic.init == "reward_model" or (
            vp and c.value_pretrain.init == "reward_model"
        )
        if needs_rm and c.advantage.estimator == "gae":
            stages.append("reward_model")
        if vp:
            stages.append("value_pretrain")
        stages.append("ppo")
        return stages

    def _init_states(self):
        c = self.config
        k_pol, k_crit, k_rm = jax.random.split(jax.random.fold_in(self.key, 0), 3)
        init = lambda key, head: sharding.init_sharded(
            self.model_config, key, self.mesh, self.rules, head
        )[0]
        if self.config.model.hf_path:
            policy_params = sharding.shard_params(
                self._hf_params, self.model_config, self.mesh, self.rules, "lm"
            )[0]
            del self._hf_params
        elif self._sft_init:
            params = sft_export.load(self._sft_init, self.model_config)
            policy_params = sharding.shard_params(
                params, self.model_config, self.mesh, self.rules, "lm"
            )[0]
        else:
            policy_params = init(k_pol, "lm")
        self.sft_tx = train_state.make_optimizer(c.sft.learning_rate, grad_clip=c.actor.grad_clip)
        self.actor_tx = train_state.make_optimizer(
            c.actor.learning_rate,
            warmup_steps=c.actor.warmup_steps,
            grad_clip=c.actor.grad_clip,
            weight_decay=c.actor.weight_decay,
        )
        self.critic_tx = train_state.make_optimizer(
            c.critic.learning_rate,
            warmup_steps=c.critic.warmup_steps,
            grad_clip=c.critic.grad_clip,
            weight_decay=c.critic.weight_decay,
        )
        self.rm_tx = train_state.make_optimizer(c.reward_model.learning_rate, grad_clip=1.0)
        self.states = train_state.ModelStates(
            policy=self._new_state(policy_params, self.actor_tx),
            sft=self._new_state(_copy(policy_params), self.sft_tx),
            critic=self._new_state(self._critic_params(init(k_crit, "value")), self.critic_tx),
            reward_model=self._new_state(init(k_rm, "value"), self.rm_tx),
            reference=_copy(policy_params),
        )

    def _critic_params(self, params, offset: float = 0.0) -> dict:
        """A value model's parameters as the critic holds them: with critic.init_offset added
        to its output on every state ("constant": the value head's bias) or as a per-response-
        token table ("linear": ``offset * (1 - t / rollout.max_new_tokens)``)."""
        c = self.config
        params = {k: v for k, v in params.items() if k != "position_offset"}  # Set afresh.
        if c.critic.init_offset_profile == "linear":
            n = c.rollout.max_new_tokens
            table = offset * (1.0 - np.arange(n, dtype=np.float32) / n)
            params["position_offset"] = self._replicated(table)
        elif offset:
            head = dict(params["value_head"])
            head["bias"] = head["bias"] + jnp.asarray(offset, head["bias"].dtype)
            params["value_head"] = head
        return params

    def _replicated(self, x) -> jax.Array:
        """A host array (the same on every process) -> a global array replicated on the mesh."""
        x = np.asarray(x)
        shard = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.make_array_from_callback(x.shape, shard, lambda idx: x[idx])

    def _new_state(self, params, tx) -> train_state.TrainState:
        """A train state whose every leaf lives on the mesh (optimiser counters and the step
        are created on one device otherwise, which a multi-process checkpoint cannot save)."""
        state = train_state.TrainState.create(params, tx)
        local = lambda a: not isinstance(a.sharding, jax.sharding.NamedSharding)
        return jax.tree.map(lambda a: self._put(self._host(a)) if local(a) else a, state)

    def _put(self, x) -> jax.Array:
        """A host array (the same on every process) -> a global array, the batch dimension
        split over the mesh's batch axes when it divides, else replicated."""
        x = np.asarray(x)
        if not (x.ndim and x.shape[0] % self._batch_shards == 0):
            return self._replicated(x)
        shard = sharding.batch_sharding(self.mesh, self.rules, x.ndim)
        return jax.make_array_from_callback(x.shape, shard, lambda idx: x[idx])

    @staticmethod
    def _host(x) -> np.ndarray:
        """A (possibly multi-process) global array -> the whole value on this host."""
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    def _rng(self, stage: str, step: int) -> tuple[jax.Array, np.random.Generator]:
        """The JAX key and NumPy generator of one step: a function of (seed, stage, step)."""
        key = jax.random.fold_in(jax.random.fold_in(self.key, STAGE_IDS[stage]), step)
        return key, np.random.default_rng([self.config.seed, STAGE_IDS[stage], step])

    # ------------------------------------------------------------------------------------------
    # Checkpoints and signals.
    # ------------------------------------------------------------------------------------------

    def _save(self, stage_index: int, stage_step: int, *, force: bool = False) -> None:
        meta = {
            "stage_index": stage_index,
            "stage_step": stage_step,
            "stage": self.stages[stage_index] if stage_index < len(self.stages) else "done",
            "stages": self.stages,
            "fingerprint": fingerprint(self.config),
            "data": self.source.state(),
        }
        self._ckpt_step += 1
        self.checkpointer.save(self._ckpt_step, self.states, meta, force=force)

    def _restore(self) -> tuple[int, int]:
        restored = self.checkpointer.restore(self.states, fingerprint(self.config))
        self._ckpt_step = self.checkpointer.latest_step() or 0
        if restored is None:
            return 0, 0
        tree, meta = restored
        if meta["stages"] != self.stages:
            raise ValueError(
                f"the checkpoint's stages {meta['stages']} differ from this config's "
                f"{self.stages}; use a new --workdir"
            )
        self.states = tree
        self.source.restore(meta.get("data", {}))
        self._truncate_metrics(meta["stage_index"], meta["stage_step"])
        print(
            f"resumed from checkpoint {self._ckpt_step}: stage {meta['stage']}, "
            f"step {meta['stage_step']}",
            file=sys.stderr,
            flush=True,
        )
        return meta["stage_index"], meta["stage_step"]

    def _truncate_metrics(self, stage_index: int, stage_step: int) -> None:
        """Drops metric rows written after the checkpoint being resumed (they will be written
        again), so that the file reads as one uninterrupted run."""
        self.metrics.trim_to(self.stages, stage_index, stage_step)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._stop_requested = True
        print("SIGTERM: saving a checkpoint after this step", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------
    # Data.
    # ------------------------------------------------------------------------------------------

    def _encoded_pairs(
        self, prompts: list[str], responses: list[str], add_eos=True
    ) -> rollout.Batch:
        """Prompt/response pairs as a batch on the mesh (demonstrations, reward-model pairs)."""
        tokens, positions, mask, rlen = rollout.encode_pairs(
            self.tokenizer, prompts, responses, self.config.data.pad_multiple, add_eos
        )
        return rollout.Batch(self._put(tokens), self._put(positions), self._put(mask), rlen)

    def _rollout(
        self, params, problems, key, sampling_params, forced: list[list[int]] | None = None
    ) -> tuple[rollout.Batch, dict, np.ndarray]:
        """Samples a response per problem and checks it (``rollout.sample``)."""
        return rollout.sample(
            self.model_config, params, problems, key, sampling_params,
            self.tokenizer, self.source.check, self._host, forced,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # Stages.
    # ------------------------------------------------------------------------------------------

    def run_sft_step(self, step: int) -> dict:
        c = self.config
        _, rng = self._rng("sft", step)
        seed = int(rng.integers(2**31))
        pairs = sft_examples(
            self.task, c.sft.batch_size, seed, c.data.direct_fraction, c.sft.min_terms
        )
        b = self._encoded_pairs([p for p, _ in pairs], [r for _, r in pairs])
        self.states.sft, m = updates.sft_step(
            self.model_config, self.states.sft, b.tokens, b.positions, b.mask
        )
        return m

    def run_reward_model_step(self, step: int) -> dict:
        c = self.config
        _, rng = self._rng("reward_model", step)
        problems = self.task.problems(c.reward_model.batch_size, int(rng.integers(2**31)))
        responses, targets = [], []
        for i, p in enumerate(problems):  # Balanced: half right, half wrong; both lengths.
            full = rng.random() >= c.data.direct_fraction
            right = i % 2 == 0
            responses.append(
                (p.full_solution if full else p.direct_solution)
                if right
                else self.task.wrong_solution(p, rng, full)
            )
            targets.append(c.reward.correct if right else c.reward.incorrect)
        b = self._encoded_pairs([p.prompt for p in problems], responses)
        last = self._host(b.positions)[np.arange(len(problems)), b.lengths - 1]
        self.states.reward_model, m = updates.reward_model_step(
            self.model_config,
            self.states.reward_model,
            b.tokens,
            self._put(last),
            self._put(np.asarray(targets, np.float32)),
        )
        return m

    def _rewards(self, correct: np.ndarray, batch: rollout.Batch) -> np.ndarray:
        c = self.config
        return rewards.terminal_rewards(
            correct,
            self._host(batch.mask),
            correct_reward=c.reward.correct,
            incorrect_reward=c.reward.incorrect,
            max_length=c.rollout.max_new_tokens,
            overlong_buffer=c.reward.overlong_buffer,
            overlong_penalty=c.reward.overlong_penalty,
            has_answer=batch.has_answer,
            format_penalty=c.reward.format_penalty,
        )

    def _minibatches(self, n: int, rng: np.random.Generator):
        perm = rng.permutation(n)
        size = n // self.config.ppo.minibatches
        for i in range(self.config.ppo.minibatches):
            yield jnp.asarray(perm[i * size : (i + 1) * size])

    def _problems(self, rng: np.random.Generator):
        c = self.config
        problems = self.source.train_problems(c.rollout.prompts_per_step, rng)
        return [p for p in problems for _ in range(c.rollout.samples_per_prompt)]

    def run_value_pretrain_step(self, step: int) -> dict:
        c = self.config
        key, rng = self._rng("value_pretrain", step)
        problems = self._problems(rng)
        batch, info, correct = self._rollout(
            self.states.policy.params, problems, key, self.sampling_params
        )
        r = self._put(self._rewards(correct, batch))
        values = updates.critic_values(
            self.model_config, self.states.critic.params, batch.tokens, batch.positions
        )
        lam = c.value_pretrain.lambda_
        _, returns = adv_lib.decoupled_gae(
            r, values, batch.mask, gamma=c.gae.gamma, lambda_actor=lam, lambda_critic=lam
        )
        metrics = []
        for _ in range(c.ppo.epochs):
            for idx in self._minibatches(len(problems), rng):
                self.states.critic, m = updates.critic_step(
                    self.model_config,
                    self.states.critic,
                    batch.tokens[idx],
                    batch.positions[idx],
                    batch.mask[idx],
                    returns[idx],
                    values[idx],
                    value_clip=None,
                    agg_mode=c.ppo.loss_agg_mode,
                )
                metrics.append(m)
        out = _mean_metrics(metrics)
        out.update(
            rollout.rollout_metrics(
                batch, correct, self._host(r), self.config.rollout.max_new_tokens
            )
        )
        out.update(info)
        return out

    def run_ppo_step(self, step: int) -> dict:
        c = self.config
        key, rng = self._rng("ppo", step)
        problems = self._problems(rng)
        t0 = time.time()
        batch, info, correct = self._rollout(
            self.states.policy.params, problems, key, self.sampling_params
        )
        r_np = self._rewards(correct, batch)
        r = self._put(r_np)
        mask = batch.mask
        if c.rollout.dynamic_sampling:  # Drop groups with no signal (all right / all wrong).
            g = correct.reshape(-1, c.rollout.samples_per_prompt)
            keep = np.repeat(~(g.all(1) | (~g).all(1)), c.rollout.samples_per_prompt)
            mask = mask * self._put(keep.astype(np.float32)[:, None])
            info["rollout/kept_fraction"] = float(keep.mean())
        temp = c.rollout.temperature or 1.0
        old_logp = updates.score_rollout(
            self.model_config, self.states.policy.params, batch.tokens, batch.positions, temp
        )
        # The sampler's log-probs should equal the trainer's (PPO's ratio starts at 1).
        info["rollout/sampler_logprob_max_diff"] = float(
            jnp.max(jnp.abs(old_logp - batch.sampler_logprobs) * mask)
        )
        ref_logp = old_logp
        if c.ppo.kl_coef > 0:
            ref_logp = updates.score_rollout(
                self.model_config, self.states.reference, batch.tokens, batch.positions, temp
            )
        gae_metrics = {}
        if c.advantage.estimator == "grpo":
            norm = adv_lib.group_normalised_advantages(
                r_np, np.ones((len(r_np), 1), np.float32), group_size=c.rollout.samples_per_prompt
            )
            advantages = self._put(norm) * mask
            values = returns = None
        else:
            values = updates.critic_values(
                self.model_config, self.states.critic.params, batch.tokens, batch.positions
            )
            lam_actor = c.gae.lambda_actor
            if c.gae.length_adaptive_alpha is not None:
                lam_actor = adv_lib.length_adaptive_lambda(
                    self._put(batch.lengths), c.gae.length_adaptive_alpha
                )
            advantages, returns = adv_lib.decoupled_gae(
                r,
                values,
                mask,
                gamma=c.gae.gamma,
                lambda_actor=lam_actor,
                lambda_critic=c.gae.lambda_critic,
            )
            adv_h, values_h = self._host(advantages), self._host(values)  # [B, T] on the host
            adv0, v0 = adv_h[:, 0], values_h[:, 0]
            gae_metrics = {
                "gae/advantage_mean": float(adv_lib.masked_mean(advantages, mask)),
                "gae/advantage_first_token": float(adv0.mean()),
                "gae/value_first_token": float(v0.mean()),
                "gae/value_mean": float(adv_lib.masked_mean(values, mask)),
                "gae/return_mean": float(adv_lib.masked_mean(returns, mask)),
            }
            # The paper's mechanism by route: which route's first token does the critic favour?
            for route, sel in (("direct", batch.direct), ("written", ~batch.direct)):
                if sel.any():
                    gae_metrics[f"gae/advantage_first_token_{route}"] = float(adv0[sel].mean())
                    gae_metrics[f"gae/value_first_token_{route}"] = float(v0[sel].mean())
            gae_metrics.update(
                mechanism_metrics(
                    adv_h, values_h, r_np, self._host(mask), batch.lengths, batch.direct
                )
            )
            if step == 0:
                _, mc = adv_lib.decoupled_gae(  # Monte Carlo returns: what values should be.
                    r,
                    jnp.zeros_like(values),
                    mask,
                    gamma=c.gae.gamma,
                    lambda_actor=1.0,
                    lambda_critic=1.0,
                )
                self._write_position_profile(values, advantages, mc, mask)
        if c.gae.whiten_advantages:
            advantages = adv_lib.masked_whiten(advantages, mask)
        is_positive = self._put(correct.astype(np.float32))
        t1 = time.time()
        metrics = []
        for _ in range(c.ppo.epochs):
            for idx in self._minibatches(len(problems), rng):
                m = {}
                if values is not None:
                    self.states.critic, m = updates.critic_step(
                        self.model_config,
                        self.states.critic,
                        batch.tokens[idx],
                        batch.positions[idx],
                        mask[idx],
                        returns[idx],
                        values[idx],
                        value_clip=c.ppo.value_clip,
                        agg_mode=c.ppo.loss_agg_mode,
                    )
                self.states.policy, am = updates.actor_step(
                    self.model_config,
                    self.states.policy,
                    batch.tokens[idx],
                    batch.positions[idx],
                    mask[idx],
                    old_logp[idx],
                    advantages[idx],
                    ref_logp[idx],
                    is_positive[idx],
                    self.actor_settings,
                )
                metrics.append({**m, **am})
        jax.block_until_ready(self.states.policy.params)
        train_s = time.time() - t1
        # How far this step's updates moved each model's outputs on the step's own batch.
        new_logp = updates.score_rollout(
            self.model_config, self.states.policy.params, batch.tokens, batch.positions, temp
        )
        info["mechanism/actor_speed"] = float(
            adv_lib.masked_mean(jnp.abs(new_logp - old_logp), mask)
        )
        if values is not None:
            new_values = updates.critic_values(
                self.model_config, self.states.critic.params, batch.tokens, batch.positions
            )
            info["mechanism/critic_speed"] = float(
                adv_lib.masked_mean(jnp.abs(new_values - values), mask)
            )
            info["mechanism/value_first_token_after"] = float(self._host(new_values[:, 0]).mean())
        out = _mean_metrics(metrics)
        out.update(gae_metrics)
        out.update(
            rollout.rollout_metrics(
                batch, correct, self._host(r), self.config.rollout.max_new_tokens
            )
        )
        out.update(info)
        tokens = float(jnp.sum(mask)) * c.ppo.epochs
        out.update(
            {
                "perf/train_seconds": train_s,
                "perf/train_tokens_per_s": tokens / train_s,
                "perf/step_seconds": time.time() - t0,
            }
        )
        return out

    def _write_position_profile(self, values, advantages, returns, mask) -> None:
        """The value / advantage / return by response position at the start of PPO."""
        arrays = [self._host(x) for x in (values, advantages, returns, mask)]
        if jax.process_index() == 0:
            metrics_lib.write_profile(self.workdir, metrics_lib.position_profile(*arrays))

    def evaluate(self, step: int) -> dict:
        c = self.config
        problems = self.source.eval_problems(c.eval.num_prompts)
        key = jax.random.fold_in(self.key, EVAL_SEED_OFFSET + step)
        greedy, _, g_correct = self._rollout(
            self.states.policy.params, problems, key, self.greedy_params
        )
        k = c.eval.num_samples
        many = [p for p in problems for _ in range(k)]
        sampled, _, s_correct = self._rollout(
            self.states.policy.params, many, key, self.sampling_params
        )
        s = s_correct.reshape(-1, k)
        out = {
            "eval/accuracy": float(g_correct.mean()),
            "eval/response_length": float(np.mean(greedy.lengths)),
            "eval/accuracy_sampled": float(s.mean()),
            f"eval/pass_at_{k}": float(s.any(1).mean()),
            "eval/response_length_sampled": float(np.mean(sampled.lengths)),
            **rollout.route_metrics("eval", sampled.direct, s_correct),
        }
        if c.eval.route_accuracy and c.data.task == "addition":
            # Greedy accuracy of each route, the route forced by writing its first tokens.
            for route, forced in zip(
                ("direct", "written"), self._route_prefixes(problems), strict=True
            ):
                _, _, ok = self._rollout(
                    self.states.policy.params, problems, key, self.greedy_params, forced
                )
                out[f"eval/accuracy_greedy_{route}_route"] = float(ok.mean())
        return out

    def _route_prefixes(self, problems) -> tuple[list[list[int]], list[list[int]]]:
        """Per problem, the response tokens that commit to the direct and to the written route:
        the shortest start of each solution's tokens whose text the other route cannot begin
        with (" Answer:" and " b" on the labelled task)."""

        def commit(solution: str, other: str) -> list[int]:
            ids = self.tokenizer.encode(solution)
            for k in range(1, len(ids) + 1):
                if not other.strip().startswith(self.tokenizer.decode(ids[:k]).strip()):
                    return ids[:k]
            return ids

        direct = [commit(p.direct_solution, p.full_solution) for p in problems]
        written = [commit(p.full_solution, p.direct_solution) for p in problems]
        return direct, written

    # ------------------------------------------------------------------------------------------
    # The loop.
    # ------------------------------------------------------------------------------------------

    def _enter_stage(self, stage: str) -> None:
        """Initialisations when a stage starts (from step 0); later checkpoints hold them."""
        c = self.config
        first_critic_stage = "value_pretrain" if "value_pretrain" in self.stages else "ppo"
        if stage == first_critic_stage and c.advantage.estimator == "gae":
            # Value pretraining starts from value_pretrain.init; without it, PPO's critic
            # starts from critic.init.
            start = c.value_pretrain.init if stage == "value_pretrain" else c.critic.init
            if start == "reward_model":
                params = _copy(self.states.reward_model.params)
            elif start == "policy":
                params = self._on_policy_backbone(self.states.critic.params)
            else:
                params = self.states.critic.params
            self.states.critic = self._new_state(
                self._critic_params(params, c.critic.init_offset), self.critic_tx
            )
        if stage == "reward_model" and c.reward_model.init == "policy":
            self.states.reward_model = self._new_state(
                self._on_policy_backbone(self.states.reward_model.params), self.rm_tx
            )
        if stage == "ppo":
            # The critic's optimiser starts afresh; the reference is the starting policy.
            self.states.critic = self._new_state(self.states.critic.params, self.critic_tx)
            self.states.reference = _copy(self.states.policy.params)

    def _on_policy_backbone(self, value_params: dict) -> dict:
        """A value model's parameters on (a copy of) the policy's backbone, keeping its own fresh
        value head."""
        params = dict(value_params)
        params["decoder"] = _copy(self.states.policy.params["decoder"])
        return params

    def _exit_stage(self, stage: str) -> None:
        if stage == "sft":  # The fine-tuned weights become the policy, with PPO's optimiser.
            self.states.policy = self._new_state(_copy(self.states.sft.params), self.actor_tx)
            self.states.reference = _copy(self.states.sft.params)
            self._export_sft_policy()

    def total_steps(self, stage: str) -> int:
        c = self.config
        return {
            "sft": c.sft.steps,
            "reward_model": c.reward_model.steps,
            "value_pretrain": c.value_pretrain.steps,
            "ppo": c.ppo.steps,
        }[stage]

    def step_functions(self) -> dict[str, Callable[[int], dict]]:
        """Stage name -> the function that runs one step of it and returns its metrics."""
        return {
            "sft": self.run_sft_step,
            "reward_model": self.run_reward_model_step,
            "value_pretrain": self.run_value_pretrain_step,
            "ppo": self.run_ppo_step,
        }

    def run(self) -> None:
        c = self.config
        stage_index, stage_step = self._restore()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        keys = {
            "sft": ("sft/loss",),
            "reward_model": ("rm/loss", "rm/accuracy"),
            "value_pretrain": (
                "critic/value_loss",
                "critic/explained_variance",
                "rollout/accuracy",
            ),
            "ppo": (
                "rollout/accuracy",
                "rollout/response_length_mean",
                "critic/explained_variance",
                "actor/clip_fraction",
            ),
        }
        steps_this_run = 0
        try:
            for i in range(stage_index, len(self.stages)):
                stage = self.stages[i]
                total = self.total_steps(stage)
                start = stage_step if i == stage_index else 0
                if start == 0:
                    self._enter_stage(stage)
                if total == 0:
                    if stage == "ppo" and start == 0:
                        # No PPO steps (an SFT-only run): evaluate the policy as it stands.
                        self.metrics.write(0, "eval", self.evaluate(0))
                    self._exit_stage(stage)
                    self._save(i + 1, 0)
                progress = Progress(stage, total, start, every=c.log_every_steps)
                step_fn = self.step_functions()[stage]
                for step in range(start, total):
                    if stage == "ppo" and step % c.eval.every_steps == 0:
                        self.metrics.write(step, "eval", self.evaluate(step))
                    row = self.metrics.write(step, stage, step_fn(step))
                    if jax.process_index() == 0:
                        progress.update(step, row, keys[stage])
                    last = step + 1 == total
                    if last:
                        self._exit_stage(stage)
                    steps_this_run += 1
                    pause = c.stop_after_steps is not None and steps_this_run >= c.stop_after_steps
                    stop = self._stop_requested or pause
                    if stop or last or (step + 1) % c.checkpoint_every_steps == 0:
                        next_i, next_step = (i + 1, 0) if last else (i, step + 1)
                        self._save(next_i, next_step, force=stop)
                    if stop:
                        self.checkpointer.wait()
                        why = "SIGTERM" if self._stop_requested else "stop_after_steps"
                        print(
                            f"stopped ({why}) after {stage} step {step + 1}; checkpoint "
                            "saved: run the same command again to continue",
                            file=sys.stderr,
                            flush=True,
                        )
                        if self._stop_requested:
                            sys.exit(143)
                        return
                if stage == "ppo" and start < total:
                    self.metrics.write(total, "eval", self.evaluate(total))
            checksum = sum(
                float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(self.states.policy.params)
            )
            print(
                f"process {jax.process_index()}/{jax.process_count()}: done; policy parameter "
                f"checksum {checksum:.6e}",
                file=sys.stderr,
                flush=True,
            )
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.checkpointer.close()
            self.metrics.close()
            self.source.close()


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    validate_config(config)
    if config.distributed:
        # Explicit settings from the environment when given (e.g. two processes on one machine);
        # otherwise JAX detects the cluster (SLURM, TPU pods, ...).
        env = os.environ
        kwargs = {}
        if "VCPPO_COORDINATOR" in env:
            kwargs = dict(
                coordinator_address=env["VCPPO_COORDINATOR"],
                num_processes=int(env["VCPPO_NUM_PROCESSES"]),
                process_id=int(env["VCPPO_PROCESS_ID"]),
            )
        jax.distributed.initialize(**kwargs)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    Experiment(config, workdir).run()
