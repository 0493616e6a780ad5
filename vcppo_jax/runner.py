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
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from vcppo_jax import metrics as metrics_lib
from vcppo_jax import (
    rewards,
    rm_export,
    rollout,
    sampling,
    sft_export,
    sharding,
    stages,
    train_state,
    updates,
)
from vcppo_jax import workdir as workdir_lib
from vcppo_jax.checkpoint import (
    RM_KEYS,
    RUN_KEYS,
    SFT_KEYS,
    Checkpointer,
    CheckpointMismatchError,
    fingerprint,
)
from vcppo_jax.config_validation import validate_config
from vcppo_jax.data.sources import EVAL_SEED_OFFSET, MathSource, SyntheticSource
from vcppo_jax.data.synthetic import AdditionTask
from vcppo_jax.metrics import MetricsWriter, Progress
from vcppo_jax.models import ModelConfig, hf
from vcppo_jax.models import attention as attention_lib
from vcppo_jax.stages import evaluation
from vcppo_jax.stages import ppo as ppo_stage
from vcppo_jax.stages import reward_model as reward_model_stage
from vcppo_jax.stages import sft as sft_stage
from vcppo_jax.stages import value_pretrain as value_pretrain_stage
from vcppo_jax.tokenizer import check_vocab

STAGE_IDS = {"sft": 1, "reward_model": 2, "value_pretrain": 3, "ppo": 4}


def planned_stages(c) -> list[str]:
    """The stages a run of config ``c`` goes through, in order (a ConfigDict, or anything with
    the same attributes): ``sft`` unless the policy comes from elsewhere, ``reward_model`` when
    the critic or value pretraining starts from it, ``value_pretrain`` for VC-PPO's critic,
    then ``ppo`` (which may have 0 steps)."""
    stages = []
    # A pretrained policy or another run's SFT policy skips SFT.
    if c.sft.steps > 0 and not c.model.hf_path and not c.sft.init_from:
        stages.append("sft")
    vp = c.critic.init == "value_pretrain" and c.advantage.estimator == "gae"
    needs_rm = c.critic.init == "reward_model" or (vp and c.value_pretrain.init == "reward_model")
    if needs_rm and c.advantage.estimator == "gae":
        stages.append("reward_model")
    if vp:
        stages.append("value_pretrain")
    stages.append("ppo")
    return stages


class Experiment:
    """One experiment in one workdir: the config wired into a task, models, stages and a
    checkpointer; ``run()`` runs (or resumes) the stages to the end."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = workdir
        # A kernel this backend or dtype lacks: a clear error now, not mid-trace.
        attention_lib.check_available(config.model.attention, config.model.dtype)
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
        self.stages = planned_stages(config)
        self._sft_init = self._check_sft_init()
        # reward_model.init_from as given (None when unset or unneeded); resolved and checked in
        # ``run`` while the reward-model stage is still to come (``_check_rm_init``).
        self._rm_init = self._rm_source()
        self.source = self._make_source()
        self.tokenizer = self.source.tokenizer
        self.model_config = self._model_config()
        # The kernel again, with the model's head dim (known only now, from a checkpoint).
        attention_lib.check_available(
            config.model.attention, config.model.dtype, head_dim=self.model_config.head_size
        )
        self.metrics = MetricsWriter(workdir, process_index=jax.process_index())
        self.checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
        self._stop_requested = False
        self.key = jax.random.key(config.seed)
        self.sampling_params = sampling.SamplingParams(
            max_new_tokens=config.rollout.max_new_tokens,
            temperature=config.rollout.temperature,
            top_p=config.rollout.top_p,
            top_k=config.rollout.top_k,
            eos_ids=(self.tokenizer.eos_id,),
            pad_id=self.tokenizer.pad_id,
            # The model's table is rounded up past the tokenizer's ids: never sample those.
            vocab_limit=self.tokenizer.vocab_size,
        )
        self.greedy_params = dataclasses.replace(self.sampling_params, temperature=0.0)
        self._stage_settings()
        self._init_states()

    # ------------------------------------------------------------------------------------------
    # Set-up.
    # ------------------------------------------------------------------------------------------

    def _stage_settings(self) -> None:
        """Each stage's settings from the config, and the context the stages share."""
        c = self.config
        self.sft_settings = sft_stage.Settings(
            c.sft.batch_size, c.data.direct_fraction, c.sft.min_terms
        )
        self.rm_settings = reward_model_stage.Settings(
            c.reward_model.batch_size,
            reward_model_stage.direct_fraction(c),
            c.reward.correct,
            c.reward.incorrect,
            c.reward_model.eval_problems,
            c.reward_model.min_terms,
            c.reward_model.pairs,
            c.reward_model.loss_on,
            c.reward_model.score,
        )
        self.vp_settings = value_pretrain_stage.Settings(
            c.value_pretrain.lambda_, c.gae.gamma, c.ppo.epochs, c.ppo.loss_agg_mode
        )
        self.vp_stop = value_pretrain_stage.StopRule(
            c.value_pretrain.until, c.value_pretrain.plateau_window, c.value_pretrain.plateau_tol
        )
        self._vp_history: list[list[float]] = []  # [value loss, explained variance] per step.
        self.ppo_settings = ppo_stage.Settings(
            actor=updates.ActorSettings(
                eps_low=c.ppo.eps_low,
                eps_high=c.ppo.eps_high,
                dual_clip=c.ppo.dual_clip,
                agg_mode=c.ppo.loss_agg_mode,
                entropy_coef=c.ppo.entropy_coef,
                kl_coef=c.ppo.kl_coef,
                kl_estimator=c.ppo.kl_estimator,
                positive_nll_coef=c.ppo.positive_nll_coef,
                temperature=c.rollout.temperature or 1.0,
            ),
            estimator=c.advantage.estimator,
            gamma=c.gae.gamma,
            lambda_actor=c.gae.lambda_actor,
            lambda_critic=c.gae.lambda_critic,
            length_adaptive_alpha=c.gae.length_adaptive_alpha,
            whiten_advantages=c.gae.whiten_advantages,
            epochs=c.ppo.epochs,
            value_clip=c.ppo.value_clip,
            dynamic_sampling=c.rollout.dynamic_sampling,
            samples_per_prompt=c.rollout.samples_per_prompt,
        )
        self.eval_settings = evaluation.Settings(
            c.eval.num_prompts,
            c.eval.num_samples,
            c.eval.route_accuracy and c.data.task == "addition",
        )
        self.ctx = stages.Context(
            model_config=self.model_config,
            task=self.task,
            source=self.source,
            tokenizer=self.tokenizer,
            sampling_params=self.sampling_params,
            greedy_params=self.greedy_params,
            put=self._to_mesh,
            host=self._to_host,
            encode_pairs=self._encoded_pairs,
            sample=self._rollout,
            rewards=self._rewards,
            train_problems=self._train_problems,
            minibatches=self._minibatches,
        )

    def _make_source(self):
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

    def _rm_source(self) -> str | None:
        """reward_model.init_from, or None when unset or when no stage needs it."""
        src = self.config.reward_model.get("init_from", "")
        if not src or "reward_model" not in self.stages:
            return None
        return src

    def _check_rm_init(self, stage_index: int) -> None:
        """Resolves reward_model.init_from to the export directory, after checking it was
        trained under this config's settings (``RM_KEYS``), when the run (fresh or resumed) has
        its reward-model stage still to come. A run resumed past that stage holds the model in
        its checkpoint and does not read the export again, so deleting an export once the runs
        reading it are past it loses nothing."""
        if self._rm_init and stage_index <= self.stages.index("reward_model"):
            self._rm_init = rm_export.resolve(self._rm_init, fingerprint(self.config, RM_KEYS))

    def _adopt_reward_model(self) -> None:
        """The reward model from reward_model.init_from, and its stage's rows in this run's
        metrics (as they were logged when it was trained)."""
        like = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.states.reward_model.params
        )
        params, rows = rm_export.load(self._rm_init, like)
        params = sharding.shard_params(params, self.model_config, self.mesh, self.rules, "value")[0]
        self.states.reward_model = self._new_state(params, self.rm_tx)
        for row in rows:
            kept = {k: v for k, v in row.items() if k not in ("step", "stage", "time")}
            self.metrics.write(row["step"], "reward_model", kept)
        print(
            f"reward model from {self._rm_init} ({len(rows)} logged rows adopted)",
            file=sys.stderr,
            flush=True,
        )

    def _export_reward_model(self) -> None:
        """WORKDIR/reward_model_export: the trained reward model, its stage's metric rows and
        the settings it was trained under (what reward_model.init_from checks)."""
        params = jax.tree.map(self._to_host, self.states.reward_model.params)
        if jax.process_index() != 0:
            return
        rows = [
            r for r in metrics_lib.read_metrics(self.metrics.path) if r["stage"] == "reward_model"
        ]
        rm_export.export(self.workdir, params, fingerprint(self.config, RM_KEYS), rows)

    def _export_sft_policy(self) -> None:
        """WORKDIR/sft_policy: the fine-tuned policy in HF format, its tokenizer and the
        settings it was trained under (what sft.init_from checks)."""
        params = jax.tree.map(self._to_host, self.states.sft.params)
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
                m.hf_path,
                param_dtype=m.param_dtype,
                dtype=m.dtype,
                remat=m.remat,
                attention=m.attention,
                value_inputs=m.get("value_inputs", "hidden"),
            )
            check_vocab(self.tokenizer, self._hf_config)
            self._hf_config = self._hf_config.replace(vocab_limit=self._vocab_limit())
            return self._hf_config
        return ModelConfig.from_fields(
            m,
            self.tokenizer.vocab_size,
            max_position_embeddings=1024,
            bos_token_id=self.tokenizer.bos_id,
            eos_token_id=self.tokenizer.eos_id,
            pad_token_id=self.tokenizer.pad_id,
            vocab_limit=self._vocab_limit(),
        )

    def _vocab_limit(self) -> int:
        """``ModelConfig.vocab_limit``: the tokenizer's size with ``model.mask_unused_vocab``
        (the ids past it get no probability in training either), else 0 (the whole table)."""
        return self.tokenizer.vocab_size if self.config.model.get("mask_unused_vocab") else 0

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
            sft=self._new_state(train_state.copy_tree(policy_params), self.sft_tx),
            critic=self._new_state(self._critic_params(init(k_crit, "value")), self.critic_tx),
            reward_model=self._new_state(init(k_rm, "value"), self.rm_tx),
            reference=train_state.copy_tree(policy_params),
        )

    def _critic_params(self, params, offset: float = 0.0) -> dict:
        """A value model's parameters with critic.init_offset applied (train_state)."""
        c = self.config
        return train_state.with_critic_offset(
            params, offset, c.critic.init_offset_profile, c.rollout.max_new_tokens, self._replicated
        )

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
        return jax.tree.map(lambda a: self._to_mesh(self._to_host(a)) if local(a) else a, state)

    def _to_mesh(self, x) -> jax.Array:
        """A host array (the same on every process) -> a global array, the batch dimension
        split over the mesh's batch axes when it divides, else replicated."""
        x = np.asarray(x)
        if not (x.ndim and x.shape[0] % self._batch_shards == 0):
            return self._replicated(x)
        shard = sharding.batch_sharding(self.mesh, self.rules, x.ndim)
        return jax.make_array_from_callback(x.shape, shard, lambda idx: x[idx])

    @staticmethod
    def _to_host(x) -> np.ndarray:
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
            "totals": {stage: self.total_steps(stage) for stage in self.stages},
            "fingerprint": fingerprint(self.config, RUN_KEYS),
            "data": self.source.state(),
            "vp_history": self._vp_history,
        }
        self._ckpt_step += 1
        self.checkpointer.save(self._ckpt_step, self.states, meta, force=force)

    def restore(self) -> tuple[int, int]:
        """Loads the workdir's latest checkpoint (refused if it is another config's) into
        ``states``, the data stream and the metrics file; returns (stage index, step in that
        stage) to go on from, (0, 0) when there is none. ``run`` calls it first; tools that
        read a finished run's models call it alone."""
        restored = self.checkpointer.restore(self.states, fingerprint(self.config, RUN_KEYS))
        self._ckpt_step = self.checkpointer.latest_step() or 0
        self._resumed_at = None
        if restored is None:
            self._start_afresh()
            return 0, 0
        tree, meta = restored
        if meta["stages"] != self.stages:
            raise CheckpointMismatchError(
                f"the checkpoint's stages {meta['stages']} differ from this config's "
                f"{self.stages}; use a new --workdir"
            )
        self._check_finished_stages(meta)
        self.states = tree
        self._resumed_at = f"{meta['stage']} step {meta['stage_step']}"
        self.source.restore(meta.get("data", {}))
        self._vp_history = meta.get("vp_history", [])
        self._truncate_metrics(meta["stage_index"], meta["stage_step"])
        print(
            f"resumed from checkpoint {self.checkpointer.restored_step}: stage {meta['stage']}, "
            f"step {meta['stage_step']}",
            file=sys.stderr,
            flush=True,
        )
        return meta["stage_index"], meta["stage_step"]

    def _start_afresh(self) -> None:
        """No checkpoint to resume from. A workdir the study drivers marked finished (``DONE``,
        e.g. restored from an archive, which keeps no checkpoints) is refused: running would
        overwrite its results. Rows an earlier attempt wrote before its first checkpoint will
        be written again; they are kept beside the file (``metrics.jsonl.unsaved-N``) first, in
        case they are all that is left of a run whose checkpoints were removed."""
        done = os.path.join(self.workdir, "DONE")
        if os.path.exists(done):
            raise workdir_lib.WorkdirError(
                f"{self.workdir} holds a finished run (DONE) but no checkpoint to resume from "
                "(restored from an archive, or its checkpoints removed); running would overwrite "
                "its results: use another --workdir"
            )
        path = self.metrics.path
        if jax.process_index() == 0 and os.path.exists(path) and os.path.getsize(path):
            n = 1
            while os.path.exists(f"{path}.unsaved-{n}"):
                n += 1
            shutil.copy2(path, f"{path}.unsaved-{n}")
            print(
                f"no checkpoint in {self.workdir}: starting afresh; the metrics rows already "
                f"there are kept in {path}.unsaved-{n}",
                file=sys.stderr,
                flush=True,
            )
        self.metrics.trim_to(self.stages, 0, 0)

    def _check_finished_stages(self, meta: dict) -> None:
        """SFT or PPO finished in the checkpoint cannot be given another step count: its last
        steps (and, for PPO, the final evaluation) have run. (The reward model's count is 0 in a
        run that reads one, and value pretraining's is a cap it may stop short of.) Checkpoints
        from before the counts were recorded are not checked."""
        saved = meta.get("totals") or {}
        finished = self.stages[: meta["stage_index"]]
        changed = [
            f"{stage}: finished at {saved[stage]} steps, now asked for {self.total_steps(stage)}"
            for stage in ("sft", "ppo")
            if stage in finished and stage in saved and saved[stage] != self.total_steps(stage)
        ]
        if changed:
            raise CheckpointMismatchError(
                f"the checkpoint in {self.workdir} has finished stages whose step count this "
                f"config changes ({'; '.join(changed)}): a finished stage is not extended or cut; "
                "use a new --workdir, or the step counts it ran with"
            )

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
        return rollout.Batch(
            self._to_mesh(tokens), self._to_mesh(positions), self._to_mesh(mask), rlen
        )

    def _rollout(
        self, params, problems, key, sampling_params, forced: list[list[int]] | None = None
    ) -> tuple[rollout.Batch, dict, np.ndarray]:
        """Samples a response per problem and checks it (``rollout.sample``)."""
        return rollout.sample(
            self.model_config, params, problems, key, sampling_params,
            self.tokenizer, self.source.check, self._to_host, forced,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # Stages.
    # ------------------------------------------------------------------------------------------

    def _rewards(self, correct: np.ndarray, batch: rollout.Batch) -> np.ndarray:
        c = self.config
        return rewards.terminal_rewards(
            correct,
            self._to_host(batch.mask),
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

    def _train_problems(self, rng: np.random.Generator):
        c = self.config
        problems = self.source.train_problems(c.rollout.prompts_per_step, rng)
        return [p for p in problems for _ in range(c.rollout.samples_per_prompt)]

    def run_sft_step(self, step: int) -> dict:
        """SFT step ``step`` (stages/sft.py); returns its metrics."""
        _, rng = self._rng("sft", step)
        self.states.sft, m = sft_stage.step(self.ctx, self.states.sft, self.sft_settings, rng)
        return m

    def run_reward_model_step(self, step: int) -> dict:
        """Reward-model step ``step`` (stages/reward_model.py); returns its metrics."""
        _, rng = self._rng("reward_model", step)
        self.states.reward_model, m = reward_model_stage.step(
            self.ctx, self.states.reward_model, self.rm_settings, rng
        )
        every = self.config.reward_model.eval_every
        if step + 1 == self.total_steps("reward_model") or (every and (step + 1) % every == 0):
            m.update(
                reward_model_stage.evaluate(self.ctx, self.states.reward_model, self.rm_settings)
            )
        return m

    def run_value_pretrain_step(self, step: int) -> dict:
        """Value-pretraining step ``step`` (stages/value_pretrain.py); returns its metrics."""
        key, rng = self._rng("value_pretrain", step)
        self.states.critic, m = value_pretrain_stage.step(
            self.ctx, self.states.critic, self.states.policy.params, self.vp_settings, key, rng
        )
        self._vp_history.append(
            [float(m["critic/value_loss"]), float(m["critic/explained_variance"])]
        )
        gains = value_pretrain_stage.plateau_gains(self._vp_history, self.vp_stop.window)
        if gains is not None:
            m["critic/plateau_loss_gain"], m["critic/plateau_ev_gain"] = gains
        return m

    def _stage_converged(self, stage: str, step: int) -> bool:
        """Whether ``stage`` ends before its step count (value pretraining's plateau rule)."""
        if stage != "value_pretrain" or not value_pretrain_stage.plateaued(
            self._vp_history, self.vp_stop
        ):
            return False
        if jax.process_index() == 0:
            loss_gain, ev_gain = value_pretrain_stage.plateau_gains(
                self._vp_history, self.vp_stop.window
            )
            print(
                f"value pretraining converged after step {step + 1}: over the last "
                f"{self.vp_stop.window} steps the value loss fell {loss_gain:.2%} and the "
                f"explained variance rose {ev_gain:+.3f} (both under {self.vp_stop.tol})",
                file=sys.stderr,
                flush=True,
            )
        return True

    def run_ppo_step(self, step: int) -> dict:
        """PPO step ``step`` (stages/ppo.py); writes the position profile at step 0."""
        key, rng = self._rng("ppo", step)
        self.states, m, adv = ppo_stage.step(
            self.ctx, self.states, self.ppo_settings, key, rng, first_step=step == 0
        )
        if adv.profile is not None and jax.process_index() == 0:
            # Value / advantage / return by response position at the start of PPO.
            metrics_lib.write_profile(self.workdir, metrics_lib.position_profile(*adv.profile))
        return m

    def evaluate(self, step: int) -> dict:
        """Held-out evaluation of the current policy before PPO step ``step``."""
        key = jax.random.fold_in(self.key, EVAL_SEED_OFFSET + step)
        return evaluation.evaluate(self.ctx, self.states.policy.params, self.eval_settings, key)

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
                params = train_state.copy_tree(self.states.reward_model.params)
            elif start == "policy":
                params = self._on_policy_backbone(self.states.critic.params)
            else:
                params = self.states.critic.params
            self.states.critic = self._new_state(
                self._critic_params(params, c.critic.init_offset), self.critic_tx
            )
        if stage == "reward_model" and self._rm_init:
            self._adopt_reward_model()
        elif stage == "reward_model" and c.reward_model.init == "policy":
            self.states.reward_model = self._new_state(
                self._on_policy_backbone(self.states.reward_model.params), self.rm_tx
            )
        if stage == "value_pretrain":
            self._vp_history = []
        if stage == "ppo":
            # The critic's optimiser starts afresh; the reference is the starting policy.
            self.states.critic = self._new_state(self.states.critic.params, self.critic_tx)
            self.states.reference = train_state.copy_tree(self.states.policy.params)

    def _on_policy_backbone(self, value_params: dict) -> dict:
        return train_state.on_policy_backbone(value_params, self.states.policy.params)

    def _exit_stage(self, stage: str) -> None:
        if stage == "sft":  # The fine-tuned weights become the policy, with PPO's optimiser.
            self.states.policy = self._new_state(
                train_state.copy_tree(self.states.sft.params), self.actor_tx
            )
            self.states.reference = train_state.copy_tree(self.states.sft.params)
            self._export_sft_policy()
        if stage == "reward_model" and not self._rm_init:
            self._export_reward_model()

    def total_steps(self, stage: str) -> int:
        """How many steps ``stage`` runs, from the config."""
        c = self.config
        return {
            "sft": c.sft.steps,
            "reward_model": 0 if self._rm_init else c.reward_model.steps,
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
        """Runs the stages from where the workdir's checkpoint left off, checkpointing as it
        goes; stops cleanly (with a checkpoint) on SIGTERM or after stop_after_steps. Steps are
        traced under the run's mesh, so kernels that must run per shard (the Pallas splash
        attention) see it, and under its logical-axis rules, so the model's activation
        constraints take the run's layout (``sharding.tracing``)."""
        with sharding.tracing(self.mesh, self.rules):
            self._run()

    def _run(self) -> None:
        c = self.config
        stage_index, stage_step = self.restore()
        self._check_rm_init(stage_index)
        if jax.process_index() == 0:  # Only now: the checkpoint's fingerprint was accepted.
            record = json.loads(c.to_json_best_effort())
            # What "auto" settings stand for on this machine, and the machine (its numerics).
            record["resolved"] = {
                "model.attention": attention_lib.resolve(
                    c.model.attention, dtype=c.model.dtype, head_dim=self.model_config.head_size
                ),
                "host": workdir_lib.host_record(),
            }
            workdir_lib.record_config(
                self.workdir, json.dumps(record, indent=2, sort_keys=True), self._resumed_at
            )
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        keys = {
            "sft": ("sft/loss",),
            "reward_model": ("rm/loss", "rm/accuracy", "rm/heldout_accuracy"),
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
                if start and stage == "reward_model" and self._rm_init:
                    # Resumed part-way through training a reward model here, now told to read
                    # one: its rows go and the export's model and rows come in instead.
                    self.metrics.trim_to(self.stages, i, 0)
                    start = 0
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
                    last = step + 1 == total or self._stage_converged(stage, step)
                    if last:
                        if stage == "ppo":  # Before the checkpoint that ends the stage.
                            self.metrics.write(total, "eval", self.evaluate(total))
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
                    if last:  # Also when the stage converged before its step count.
                        break
            if self._stop_requested:  # SIGTERM during an evaluation after the last step.
                self.checkpointer.wait()
                print(
                    "stopped (SIGTERM) after the last step: the run is complete and saved",
                    file=sys.stderr,
                    flush=True,
                )
                sys.exit(143)
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
    """Validates ``config`` and runs its experiment in ``workdir`` (resuming if it holds one)."""
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
    workdir_lib.prepare(workdir)
    lock = workdir_lib.WorkdirLock(workdir) if jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        Experiment(config, workdir).run()
    finally:
        if lock is not None:
            lock.release()
