"""The reward model (the critic's start in the paper's PPO baseline): a value-head model
trained on balanced right / wrong responses of both routes, scored at the last token.

Every ``reward_model.eval_every`` steps and at its last step it is scored on a fixed held-out
set: ``reward_model.eval_problems`` problems never drawn for training, each with a right and a
wrong answer on each route (4 responses). A response counts as separated when its score lies
on its own side of the midpoint of the two targets; ``rm/heldout_accuracy`` (and by route,
``..._written``, ``..._direct``) is the share separated, ``rm/heldout_margin`` the mean score
of right answers minus that of wrong ones. ``rm/heldout_pair_accuracy`` (and by route) needs
no threshold: the share of (problem, route) pairs whose right answer scores above its wrong one
(a tie counts half), the preference accuracy reward models are usually reported by; a model
that ranks answers well but sits on one side of the midpoint shows there, not in the sign.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vcppo_jax import rollout, updates
from vcppo_jax.data.synthetic import AdditionTask, mixed_length_problems
from vcppo_jax.stages import Context
from vcppo_jax.train_state import TrainState


def direct_fraction(config) -> float:
    """The share of training pairs on the direct route: ``reward_model.direct_fraction``, or
    the SFT demonstrations' ``data.direct_fraction`` where it is None."""
    share = config.reward_model.direct_fraction
    return float(config.data.direct_fraction if share is None else share)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The reward model's config fields (``reward_model.*``, ``reward.*``)."""

    batch_size: int
    direct_fraction: float  # Share of pairs whose response takes the short route.
    correct: float  # Target for a right response (reward.correct).
    incorrect: float  # Target for a wrong one (reward.incorrect).
    eval_problems: int = 64  # Held-out problems (4 responses each).
    min_terms: int = 0  # > 0: training chains of min_terms..num_terms terms (uniform).
    # "same_problem": each problem answered right and wrong on one route (the two answers
    # differ only from the slip on); "independent": every response its own problem.
    pairs: str = "independent"
    # "last_token": the score at EOS regressed on the outcome; "every_token": every response
    # token's score is (a token-level verifier objective); "process": every token's score
    # regressed on whether the response is still right up to that token (process
    # supervision: wrong from the first token where it leaves the right answer on);
    # "first_slip": the same targets up to and including that token, none after it (as step
    # labels stop at the first wrong step), so a slip need only be seen where it happens; the
    # slips and the right slots weigh half each (``class_balanced``); "min": the lowest score
    # over the response's tokens regressed on the outcome (an outcome objective for a reward
    # model read by ``score="min"``: a right answer's every token is pushed up to the right
    # target, a wrong answer's lowest one down).
    loss_on: str = "last_token"
    # How a response's score is read: "last_token" (at EOS, as outcome reward models are read)
    # or "min" (the lowest score over its tokens, as process reward models aggregate steps:
    # a slip found where it happens need not be carried to EOS). Held-out metrics are reported
    # for both; the unprefixed ones follow this field.
    score: str = "last_token"


# Ways to draw a training batch (``reward_model.pairs``); see ``Settings.pairs``.
PAIRS = ("independent", "same_problem")
# Where the loss is taken (``reward_model.loss_on``); see ``Settings.loss_on``.
LOSS_ON = ("last_token", "every_token", "process", "first_slip", "min")
# How a response's score is read from its tokens' scores (``reward_model.score``).
SCORES = ("last_token", "min")

# Held-out problems come from this seed; training draws its seeds below 2**31.
HELDOUT_SEED = 2**31 + 17


def balanced_pairs(
    task: AdditionTask, settings: Settings, rng: np.random.Generator
) -> tuple[list, list[str], list[float]]:
    """(problems, responses, targets): every other response right, the rest wrong answers of
    the same shape (``task.wrong_solution``); routes drawn with ``direct_fraction``; chain
    lengths mixed when ``min_terms`` > 0 (the held-out set is always at full length). With
    ``pairs="same_problem"`` responses 2i and 2i+1 answer the same problem on the same route."""
    seed = int(rng.integers(2**31))
    paired = settings.pairs == "same_problem"
    n = settings.batch_size // 2 if paired else settings.batch_size
    problems = mixed_length_problems(task, n, seed, rng, settings.min_terms)
    if paired:
        problems = [p for p in problems for _ in range(2)]
    responses, targets = [], []
    full = True
    for i, p in enumerate(problems):
        if not (paired and i % 2):
            full = rng.random() >= settings.direct_fraction
        right = i % 2 == 0
        responses.append(
            (p.full_solution if full else p.direct_solution)
            if right
            else task.wrong_solution(p, rng, full)
        )
        targets.append(settings.correct if right else settings.incorrect)
    return problems, responses, targets


def step(
    ctx: Context, state: TrainState, settings: Settings, rng: np.random.Generator
) -> tuple[TrainState, dict]:
    """One reward-model update on a fresh balanced batch drawn with ``rng``."""
    problems, responses, targets = balanced_pairs(ctx.task, settings, rng)
    b = ctx.encode_pairs([p.prompt for p in problems], responses)
    positions = ctx.host(b.positions)
    last = positions[np.arange(len(problems)), b.lengths - 1]
    every = (b.positions, b.mask) if settings.loss_on != "last_token" else (None, None)
    per_token = None
    if settings.loss_on in ("process", "first_slip"):
        width = positions.shape[1]
        per_token = ctx.put(process_targets(ctx.tokenizer, problems, responses, width, settings))
        if settings.loss_on == "first_slip":
            keep = ctx.host(b.mask) * up_to_slip(ctx.tokenizer, problems, responses, width)
            wrong = ctx.host(per_token) == settings.incorrect
            every = (b.positions, ctx.put(class_balanced(keep, wrong)))
    return updates.reward_model_step(
        ctx.model_config,
        state,
        b.tokens,
        ctx.put(last),
        ctx.put(np.asarray(targets, np.float32)),
        *every,
        token_targets=per_token,
        on_min=settings.loss_on == "min",
    )


def first_slip(tokenizer, response: str, reference: str) -> int | None:
    """Index of the first response token (EOS included) that differs from the right answer
    ``reference``, or None where the response is the reference."""
    got = tokenizer.encode(response, add_eos=True)
    ref = tokenizer.encode(reference, add_eos=True)
    for j, (a, b) in enumerate(zip(got, ref, strict=False)):
        if a != b:
            return j
    return None if len(got) == len(ref) else min(len(got), len(ref))


def _slips(tokenizer, problems: list, responses: list[str]) -> list[int | None]:
    """Each response's first slip against its problem's right answer on its route."""
    out = []
    for p, r in zip(problems, responses, strict=True):
        ref = p.direct_solution if rollout.is_direct(r) else p.full_solution
        out.append(first_slip(tokenizer, r, ref))
    return out


def up_to_slip(tokenizer, problems: list, responses: list[str], width: int) -> np.ndarray:
    """[B, width] 1 on a response's tokens up to and including its slip (every slot of a right
    response), 0 after it: the slots ``loss_on="first_slip"`` trains on."""
    out = np.ones((len(responses), width), np.float32)
    for i, j in enumerate(_slips(tokenizer, problems, responses)):
        if j is not None:
            out[i, j + 1 :] = 0.0
    return out


def class_balanced(weights: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """``weights`` rescaled so the slots marked ``wrong`` and the others weigh half each, the
    total unchanged: under ``loss_on="first_slip"`` a wrong answer has one wrong slot among
    hundreds of right ones, and a score of +1 everywhere would otherwise be nearly optimal."""
    w = weights.astype(np.float32)
    total, neg = w.sum(), (w * wrong).sum()
    if neg == 0 or neg == total:
        return w
    return np.where(wrong, w * 0.5 * total / neg, w * 0.5 * total / (total - neg))


def process_targets(
    tokenizer, problems: list, responses: list[str], width: int, settings: Settings
) -> np.ndarray:
    """Per-token targets [B, width] for ``loss_on="process"``: ``settings.correct`` on every
    token of a right response and on a wrong one's tokens before its slip (the first token
    where it leaves its problem's right answer on its route), ``settings.incorrect`` from the
    slip on. Slots past a response's end are masked out by the caller."""
    out = np.full((len(responses), width), settings.correct, np.float32)
    for i, j in enumerate(_slips(tokenizer, problems, responses)):
        if j is not None:
            out[i, j:] = settings.incorrect
    return out


def heldout_set(task: AdditionTask, n: int) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(prompts, responses, right [4n] bool, written [4n] bool): each of ``n`` held-out problems
    answered right and wrong on each route (the wrong ones as in training)."""
    rng = np.random.default_rng(HELDOUT_SEED)
    return answered_four_ways(task, task.problems(n, HELDOUT_SEED), rng)


def answered_four_ways(
    task: AdditionTask, problems: list, rng: np.random.Generator
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(prompts, responses, right, written), 4 per problem: right and wrong on each route."""
    prompts, responses, right, written = [], [], [], []
    for p in problems:
        for full in (True, False):
            good = p.full_solution if full else p.direct_solution
            for ok, text in ((True, good), (False, task.wrong_solution(p, rng, full))):
                prompts.append(p.prompt)
                responses.append(text)
                right.append(ok)
                written.append(full)
    return prompts, responses, np.array(right), np.array(written)


def response_scores(token_scores: np.ndarray, mask: np.ndarray, how: str) -> np.ndarray:
    """Each response's score [B] from its tokens' scores [B, N] (``mask`` 1 on real tokens,
    every row at least one): the last real token's ("last_token") or the lowest ("min")."""
    real = mask > 0
    if how == "last_token":
        last = real.shape[1] - 1 - np.argmax(real[:, ::-1], axis=1)
        return token_scores[np.arange(len(token_scores)), last]
    if how == "min":
        return np.where(real, token_scores, np.inf).min(axis=1)
    raise ValueError(f"reward_model.score={how!r}: expected one of {SCORES}")


def evaluate(ctx: Context, state: TrainState, settings: Settings) -> dict[str, float]:
    """The reward model's separation of right from wrong answers on the held-out set, by the
    configured score (``rm/heldout_*``) and by each way of reading it
    (``rm/heldout_<score>_*``)."""
    prompts, responses, right, written = heldout_set(ctx.task, settings.eval_problems)
    scores = {how: [] for how in SCORES}
    chunk = settings.batch_size
    for i in range(0, len(prompts), chunk):
        b = ctx.encode_pairs(prompts[i : i + chunk], responses[i : i + chunk])
        v = ctx.host(
            updates.reward_token_scores(ctx.model_config, state.params, b.tokens, b.positions)
        )
        mask = ctx.host(b.mask)
        for how in SCORES:
            scores[how].append(response_scores(v, mask, how))
    scores = {how: np.concatenate(s) for how, s in scores.items()}
    out = separation(scores[settings.score], right, written, settings)
    for how in SCORES:
        for k, val in separation(scores[how], right, written, settings).items():
            out[k.replace("rm/heldout_", f"rm/heldout_{how}_")] = val
    return out


def separation(
    scores: np.ndarray, right: np.ndarray, written: np.ndarray, settings: Settings
) -> dict[str, float]:
    """Held-out metrics from scores [M], whether each answer is right and written. A group
    with no answers in it (a route, or right or wrong answers, absent) has no key rather
    than a NaN."""
    mid = 0.5 * (settings.correct + settings.incorrect)
    sign = 1.0 if settings.correct > settings.incorrect else -1.0
    ok = (sign * (scores - mid) > 0) == right
    out = {}

    def put(key: str, values: np.ndarray) -> None:
        if values.size:
            out[key] = float(values.mean())

    put("rm/heldout_accuracy", ok)
    put("rm/heldout_accuracy_written", ok[written])
    put("rm/heldout_accuracy_direct", ok[~written])
    if right.any() and not right.all():
        out["rm/heldout_margin"] = float(scores[right].mean() - scores[~right].mean())
    # Pairs as answered_four_ways lays them out: each right answer followed by its wrong one.
    if len(scores) % 2 == 0 and right[0::2].all() and not right[1::2].any():
        d = sign * (scores[0::2] - scores[1::2])
        won = np.where(d > 0, 1.0, np.where(d == 0, 0.5, 0.0))
        pw = written[0::2]
        put("rm/heldout_pair_accuracy", won)
        put("rm/heldout_pair_accuracy_written", won[pw])
        put("rm/heldout_pair_accuracy_direct", won[~pw])
    return out
