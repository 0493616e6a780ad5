"""Answer extraction, verification (with a hanging verifier) and terminal rewards."""

import os
import signal
import time
import warnings

import numpy as np
import pytest

from vcppo_jax import rewards, rollout
from vcppo_jax.data.synthetic import LABELS, AdditionTask, sft_examples


def test_extract_answer():
    assert rewards.extract_answer("so \\boxed{\\frac{1}{2}} and \\boxed{3}") == "3"
    assert rewards.extract_answer("x = \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert rewards.extract_answer("steps ... Answer: 236.") == "236"
    assert rewards.extract_answer("1+2=3 ; 3+4=7") == "7"
    assert rewards.extract_answer("Answer:") is None
    assert rewards.extract_answer("nothing here") is None
    assert rewards.extract_answer("\\boxed{unbalanced") is None


def test_exact_match_on_the_task():
    task = AdditionTask(num_terms=4, digits=2)
    for p in task.problems(20, seed=0):
        assert rewards.exact_match(p.full_solution, p.answer)
        assert rewards.exact_match(p.direct_solution, p.answer)
        assert not rewards.exact_match(
            p.full_solution.replace(p.answer, str(int(p.answer) + 1)), p.answer
        )
    assert rewards.exact_match(" Answer: 1,000", "1000")


def test_synthetic_task_is_correct_and_long():
    task = AdditionTask(num_terms=5, digits=2)
    p = task.make([23, 45, 12, 67, 89])
    assert p.answer == "236"
    assert p.full_solution == " 23+45=68 ; 68+12=80 ; 80+67=147 ; 147+89=236 . Answer: 236"
    assert p.direct_solution == " Answer: 236"
    rng_problems = task.problems(50, seed=1)
    assert all(int(p.answer) == sum(p.terms) for p in rng_problems)
    assert all(10 <= t < 100 for p in rng_problems for t in p.terms)
    pairs = sft_examples(task, 400, seed=2, direct_fraction=0.25)
    direct = np.mean([r.startswith(" Answer:") for _, r in pairs])
    assert 0.18 < direct < 0.32
    with pytest.raises(ValueError, match="num_terms"):
        AdditionTask(num_terms=1)


def _steps(solution: str) -> list[tuple[str, int, int, int]]:
    """(label, acc, term, result) of each written step, parsed independently of the task."""
    body = solution.strip().split(" . ")[0]
    out = []
    for step in body.split(" ; "):
        label, _, arith = step.rpartition(":")
        lhs, res = arith.split("=")
        a, t = lhs.split("+")
        out.append((label, int(a), int(t), int(res)))
    return out


def test_labelled_task_names_each_term_and_step():
    task = AdditionTask(num_terms=4, digits=1, labels=True)
    p = task.make([3, 5, 7, 2])
    assert p.prompt == "Add: a3 b5 c7 d2 ="
    assert p.full_solution == " b5:3+5=8 ; c7:8+7=15 ; d2:15+2=17 . Answer: 17"
    assert p.direct_solution == " Answer: 17"
    long = AdditionTask(num_terms=32, digits=1, labels=True)
    for q in long.problems(20, seed=3):
        steps = _steps(q.full_solution)
        assert [s[0] for s in steps] == [
            f"{a}{t}" for a, t in zip("bcdefghijklmnopqrstuvwxyzABCDEF", q.terms[1:], strict=True)
        ]
        assert [s[2] for s in steps] == list(q.terms[1:])
        assert all(a + t == r for _, a, t, r in steps)
        assert rewards.exact_match(q.full_solution, q.answer)
    with pytest.raises(ValueError, match="at most 52|<= 52"):
        AdditionTask(num_terms=53, digits=1, labels=True)


def test_carried_task_restates_the_terms_still_to_add():
    task = AdditionTask(num_terms=4, digits=1, labels=True, carry_every=1)
    p = task.make([3, 5, 7, 2])
    assert p.full_solution == " b5:3+5=8 | c7 d2 ; c7:8+7=15 | d2 ; d2:15+2=17 . Answer: 17"
    for n, every in ((14, 1), (24, 6), (23, 5)):
        task = AdditionTask(num_terms=n, digits=1, labels=True, carry_every=every)
        for q in task.problems(20, seed=3):
            named = [f"{a}{t}" for a, t in zip(LABELS, q.terms, strict=False)]
            latest = named  # The newest list naming the terms: the prompt, then each restated.
            steps = q.full_solution.strip().split(" . ")[0].split(" ; ")
            assert len(steps) == n - 1
            for i, step in enumerate(steps, 1):
                head, bar, carried = step.partition(" |")
                label, _, arith = head.partition(":")
                lhs, res = arith.split("=")
                a, t = map(int, lhs.split("+"))
                # The step's term is in the newest list, written at most `every` steps back.
                assert label == named[i] and label in latest and t == q.terms[i]
                assert a + t == int(res) == sum(q.terms[: i + 1])
                assert bool(bar) == (i % every == 0 and i < n - 1)
                if bar:  # Restated: exactly the terms after this one.
                    assert carried.split() == named[i + 1 :]
                    latest = carried.split()
            assert rewards.exact_match(q.full_solution, q.answer)
    with pytest.raises(ValueError, match="labels"):
        AdditionTask(num_terms=4, digits=1, carry_every=2)


@pytest.mark.parametrize("labels", [False, True])
def test_wrong_solutions_have_one_wrong_step_carried_to_the_answer(labels):
    task = AdditionTask(num_terms=6, digits=1, labels=labels)
    rng = np.random.default_rng(0)
    for p in task.problems(50, seed=4):
        wrong = task.wrong_solution(p, rng, full=True)
        steps = _steps(wrong)
        bad = [i for i, (_, a, t, r) in enumerate(steps) if a + t != r]
        assert (
            len(bad) == 1 and 1 <= abs(steps[bad[0]][3] - steps[bad[0]][1] - steps[bad[0]][2]) <= 9
        )
        assert [s[2] for s in steps] == list(p.terms[1:])
        # Every step after the wrong one continues from the wrong partial sum.
        assert all(steps[i][1] == steps[i - 1][3] for i in range(1, len(steps)))
        assert not rewards.exact_match(wrong, p.answer)
        short = task.wrong_solution(p, rng, full=False)
        assert (
            short.startswith(" Answer: ") and 1 <= abs(int(short.split()[-1]) - int(p.answer)) <= 9
        )


def test_sft_examples_of_mixed_chain_lengths():
    task = AdditionTask(num_terms=12, digits=1, labels=True)
    pairs = sft_examples(task, 300, seed=5, direct_fraction=0.3, min_terms=4)
    counts = [p.count(" ") - 1 for p, _ in pairs]  # "Add: a1 b2 ... =": one space per term.
    assert min(counts) == 4 and max(counts) == 12 and len(set(counts)) == 9
    for prompt, response in pairs:
        terms = [int(x[1:]) for x in prompt.split()[1:-1]]
        assert response.endswith(f"Answer: {sum(terms)}")
    # Off (0, or the task's own length): the same examples as before the option existed.
    assert sft_examples(task, 20, 5, 0.3) == sft_examples(task, 20, 5, 0.3, min_terms=12)


def test_terminal_rewards():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    r = rewards.terminal_rewards(
        np.array([True, False, True]), mask, correct_reward=0.5, incorrect_reward=-1.0
    )
    assert r.dtype == np.float32  # Fractional rewards survive.
    np.testing.assert_array_equal(r, [[0, 0, 0.5, 0], [-1, 0, 0, 0], [0, 0, 0, 0]])
    # DAPO overlong: max 10, buffer 4 -> penalty starts after 6 tokens, full at 10.
    mask = (np.arange(10)[None] < np.array([[5], [8], [10]])).astype(np.float32)
    r = rewards.terminal_rewards(
        np.array([True, True, True]), mask, max_length=10, overlong_buffer=4, overlong_penalty=1.0
    )
    np.testing.assert_allclose(r.sum(1), [1.0, 0.5, 0.0])


def _hang_on_x(pred, gold):
    if "x" in pred:
        time.sleep(60)
    if "crash" in pred:
        raise RuntimeError("verifier crashed")
    return pred.strip() == gold


def test_verifier_timeout_and_crash_count_as_incorrect():
    v = rewards.MathVerifier(workers=2, timeout_s=2.0, verify_fn=_hang_on_x)
    try:
        t0 = time.time()
        res = v(["1", "x", "2", "crash"], ["1", "1", "3", "1"])
        assert time.time() - t0 < 20
        np.testing.assert_array_equal(res.correct, [True, False, False, False])
        assert res.timeouts == 1 and res.errors == 1
        res = v(["5"], ["5"])  # A fresh pool after the hang.
        assert res.correct.tolist() == [True]
    finally:
        v.close()


def _slow_or_hang(pred, gold):
    if pred.startswith("slow"):
        time.sleep(0.3)
    if pred.startswith("hang"):
        time.sleep(60)
    return pred.split()[-1] == gold


def test_queued_answers_are_not_charged_for_waiting_and_counts_repeat():
    """Each answer's clock starts when a worker starts it: 4 answers that hang (cut off at 1.5 s
    each) and 4 that take 0.3 s, on 2 workers, delay the 4 quick answers behind them by ~4 s,
    yet only the hanging ones time out, on every identical call."""
    v = rewards.MathVerifier(workers=2, timeout_s=1.5, verify_fn=_slow_or_hang)
    texts = ["hang 1"] * 4 + ["slow 2"] * 4 + ["3"] * 4
    golds = ["1"] * 4 + ["2"] * 4 + ["3"] * 4
    try:
        for _ in range(2):
            res = v(texts, golds)
            assert res.timeouts == 4 and res.errors == 0
            np.testing.assert_array_equal(res.correct, [False] * 4 + [True] * 8)
    finally:
        v.close()


def _hang_beyond_the_timer(pred, gold):
    if pred == "stuck":  # Like a hang inside C code: the worker's alarm never lands.
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        time.sleep(60)
    return pred == gold


def test_a_worker_stuck_beyond_the_timer_is_cut_off_by_the_batch_deadline(monkeypatch):
    monkeypatch.setattr(rewards, "BATCH_SLACK_S", 3.0)
    v = rewards.MathVerifier(workers=2, timeout_s=1.0, verify_fn=_hang_beyond_the_timer)
    try:
        t0 = time.time()
        res = v(["stuck", "4", "5"], ["1", "4", "6"])
        assert time.time() - t0 < 15
        np.testing.assert_array_equal(res.correct, [False, True, False])
        assert res.timeouts == 1 and res.errors == 0
        assert v(["7"], ["7"]).correct.tolist() == [True]  # A fresh pool after the hang.
    finally:
        v.close()


def _spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def _math_verify_then_spin(pred, gold):
    """math-verify's own check, then 3 s more work where the answer says "slow"."""
    ok = rewards._math_verify_one(pred, gold)
    if "slow" in pred:
        _spin(3.0)
    return ok


def test_the_answer_timeout_holds_across_math_verify():
    """math-verify's parse and verify must not arm and cancel SIGALRM timers of their own: an
    answer math-verify has checked that then runs past its time is cut off at its own timeout
    and counted as one."""
    v = rewards.MathVerifier(workers=1, timeout_s=60.0, verify_fn=_math_verify_then_spin)
    try:
        assert v(["\\boxed{2}"], ["2"]).correct.tolist() == [True]  # Imports math-verify.
        v.timeout_s = 0.5
        t0 = time.monotonic()
        res = v(["slow \\boxed{3}", "\\boxed{4}"], ["3", "4"])
        assert time.monotonic() - t0 < 2.5
        assert res.correct.tolist() == [False, True]
        assert res.timeouts == 1 and res.errors == 0
    finally:
        v.close()


def _own_alarm(pred, gold):
    """Arms and cancels a SIGALRM timer of its own, as math-verify's timeout decorator does,
    and swallows its own timeout; "inner" runs 3 s inside that timer, "outer" 3 s after it."""

    def handler(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, handler)
    signal.alarm(5)
    try:
        if pred.startswith("inner"):
            _spin(3.0)
        ok = pred.split()[-1] == gold
    except TimeoutError:
        ok = True  # A verifier that answers anyway: the time it took still counts.
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if pred.startswith("outer"):
        _spin(3.0)
    return ok


def test_the_answer_timeout_holds_when_the_verifier_uses_sigalrm():
    v = rewards.MathVerifier(workers=2, timeout_s=0.5, verify_fn=_own_alarm)
    try:
        assert v(["1", "2"], ["1", "2"]).correct.tolist() == [True, True]  # Starts the pool.
        for _ in range(2):
            t0 = time.monotonic()
            res = v(["outer 1", "inner 2", "3", "4"], ["1", "2", "3", "0"])
            assert time.monotonic() - t0 < 2.5
            np.testing.assert_array_equal(res.correct, [False, False, True, False])
            assert res.timeouts == 2 and res.errors == 0
    finally:
        v.close()


def _exit_on_die(pred, gold):
    if pred == "die":
        os._exit(1)
    if pred == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    return pred == gold


def test_a_crashed_worker_costs_only_its_own_answer():
    """A verifier that kills its worker process scores that answer as an error; every other
    answer of the batch keeps its real outcome, and the next batch runs on a fresh pool."""
    v = rewards.MathVerifier(workers=2, timeout_s=5.0, verify_fn=_exit_on_die)
    try:
        res = v(["1", "die", "3", "4", "5"], ["1", "2", "3", "0", "5"])
        np.testing.assert_array_equal(res.correct, [True, False, True, False, True])
        assert res.errors == 1 and res.timeouts == 0
        res = v(["6", "7"], ["6", "0"])
        assert res.correct.tolist() == [True, False] and res.errors == 0
        res = v(["8", "die", "segv", "9", "die"], ["8", "1", "1", "9", "1"])
        np.testing.assert_array_equal(res.correct, [True, False, False, True, False])
        assert res.errors == 3 and res.timeouts == 0
        assert v(["10"], ["10"]).correct.tolist() == [True]
    finally:
        v.close()


@pytest.mark.slow
def test_math_verify_latex_equivalence():
    v = rewards.MathVerifier(workers=1, timeout_s=30.0)
    try:
        res = v(
            ["The answer is \\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{3}"],
            ["0.5", "\\frac{1}{2}", "4"],
        )
        assert res.correct.tolist() == [True, True, False]
    finally:
        v.close()


def test_format_penalty_only_where_no_answer():
    mask = np.ones((3, 4), np.float32)
    r = rewards.terminal_rewards(
        np.array([True, False, False]),
        mask,
        has_answer=np.array([True, True, False]),
        format_penalty=0.5,
    )
    np.testing.assert_allclose(r[:, -1], [1.0, -1.0, -1.5])


def test_reward_model_heldout_set_and_separation():
    from vcppo_jax.stages import reward_model as rm

    task = AdditionTask(5, 1)
    prompts, responses, right, written = rm.heldout_set(task, 6)
    assert len(responses) == 24 and right.sum() == 12 and written.sum() == 12
    assert len(set(prompts)) == 6
    problems = {p.prompt: p for p in task.problems(6, rm.HELDOUT_SEED)}
    for prompt, text, ok, full in zip(prompts, responses, right, written, strict=True):
        assert rewards.exact_match(text, problems[prompt].answer) == ok
        assert rollout.is_direct(text) != full
    settings = rm.Settings(4, 0.3, 1.0, -1.0)
    scores = np.array([0.9, -0.2, 0.1, 0.4, -0.5, -0.7, 0.3, 0.2])
    r = np.array([True, False, True, False, True, False, True, False])
    w = np.array([True, True, True, True, False, False, False, False])
    got = rm.separation(scores, r, w, settings)
    # By hand: written 0.9 ok, -0.2 ok, 0.1 ok, 0.4 wrong; direct -0.5 wrong, -0.7 ok, 0.3 ok,
    # 0.2 wrong.
    assert got["rm/heldout_accuracy_written"] == 0.75
    assert got["rm/heldout_accuracy_direct"] == 0.5
    assert got["rm/heldout_accuracy"] == 0.625
    np.testing.assert_allclose(got["rm/heldout_margin"], (0.8 / 4) - (-0.3 / 4))
    # Pairs (right, wrong) by hand: (0.9, -0.2) won, (0.1, 0.4) lost, (-0.5, -0.7) won,
    # (0.3, 0.2) won; no threshold involved.
    assert got["rm/heldout_pair_accuracy_written"] == 0.5
    assert got["rm/heldout_pair_accuracy_direct"] == 1.0
    assert got["rm/heldout_pair_accuracy"] == 0.75
    tied = rm.separation(np.full(8, -0.9), r, w, settings)
    assert tied["rm/heldout_pair_accuracy"] == 0.5 and tied["rm/heldout_accuracy"] == 0.5
    # Every score on one side of the midpoint, yet ranked right: the sign says chance, the
    # pairs say perfect.
    ranked = rm.separation(np.array([-0.1, -0.9] * 4), r, w, settings)
    assert ranked["rm/heldout_accuracy"] == 0.5 and ranked["rm/heldout_pair_accuracy"] == 1.0
    # Three written answers: no pairs and no direct route, so no keys for them (not NaN).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        few = rm.separation(scores[:3], r[:3], w[:3], settings)
    assert "rm/heldout_pair_accuracy" not in few and "rm/heldout_accuracy_direct" not in few
    assert few["rm/heldout_accuracy_written"] == 1.0
    assert "rm/heldout_margin" not in rm.separation(scores[::2], r[::2], w[::2], settings)
    # Targets 0 / -1: the midpoint -0.5 separates.
    got = rm.separation(scores, r, w, rm.Settings(4, 0.3, 0.0, -1.0))
    assert got["rm/heldout_accuracy_written"] == 0.5  # Every written score is above -0.5.
    assert got["rm/heldout_accuracy_direct"] == 0.5


@pytest.mark.parametrize("pairs", ["same_problem", "independent"])
def test_reward_model_training_pairs(pairs):
    """same_problem: responses 2i, 2i+1 answer one problem on one route, right then wrong, and
    differ only from the slip on; independent: every response its own problem."""
    from vcppo_jax.stages import reward_model as rm

    task = AdditionTask(6, 1, labels=True, carry_every=1)
    settings = rm.Settings(40, 0.4, 1.0, -1.0, pairs=pairs)
    problems, responses, targets = rm.balanced_pairs(task, settings, np.random.default_rng(3))
    assert len(problems) == len(responses) == 40
    assert targets == [1.0, -1.0] * 20
    for p, text, t in zip(problems, responses, targets, strict=True):
        assert rewards.exact_match(text, p.answer) == (t > 0)
    routes = [rollout.is_direct(r) for r in responses]
    assert 0 < sum(routes) < 40  # Both routes drawn.
    same = [problems[i].prompt == problems[i + 1].prompt for i in range(0, 40, 2)]
    if pairs == "same_problem":
        assert all(same)
        assert routes[0::2] == routes[1::2]
        for i in range(0, 40, 2):
            right, wrong = responses[i], responses[i + 1]
            if not routes[i]:  # Written: a common prefix up to the slipped partial sum.
                common = os.path.commonprefix([right, wrong])
                assert 0 < len(common) < len(right)
    else:
        assert not any(same)


def test_reward_model_direct_fraction():
    """reward_model.direct_fraction sets the reward model's share of direct pairs (1.0: only
    bare answers), None follows data.direct_fraction; a value outside [0, 1] is refused."""
    from configs import ppo
    from vcppo_jax.config_validation import ConfigError, validate_config
    from vcppo_jax.stages import reward_model as rm

    c = ppo.get_config("smoke")
    assert c.reward_model.direct_fraction is None
    assert rm.direct_fraction(c) == c.data.direct_fraction
    c.reward_model.direct_fraction = 1.0
    validate_config(c)
    assert rm.direct_fraction(c) == 1.0
    task = AdditionTask(6, 1, labels=True, carry_every=1)
    settings = rm.Settings(20, rm.direct_fraction(c), 1.0, -1.0)
    _, responses, _ = rm.balanced_pairs(task, settings, np.random.default_rng(0))
    assert all(rollout.is_direct(r) for r in responses)
    c.reward_model.direct_fraction = 1.5
    with pytest.raises(ConfigError, match="reward_model.direct_fraction"):
        validate_config(c)


def test_process_targets_turn_wrong_at_the_slip(tmp_path):
    """reward_model.loss_on='process': a right response is right at every token; a wrong one
    is right up to the token where it leaves its problem's right answer on its route (the
    slipped partial sum, or the direct answer's first wrong digit) and wrong from there to EOS."""
    from vcppo_jax.data.sources import SyntheticSource
    from vcppo_jax.stages import reward_model as rm

    task = AdditionTask(6, 1, labels=True, carry_every=1)
    tok = SyntheticSource(task, str(tmp_path), 0, 96).tokenizer  # As the runner builds it.
    settings = rm.Settings(40, 0.4, 1.0, -1.0, pairs="same_problem")
    problems, responses, targets = rm.balanced_pairs(task, settings, np.random.default_rng(5))
    width = max(len(tok.encode(r, add_eos=True)) for r in responses)
    out = rm.process_targets(tok, problems, responses, width, settings)
    keep = rm.up_to_slip(tok, problems, responses, width)  # loss_on="first_slip"
    routes = set()
    for i in range(0, 40, 2):
        right, wrong = responses[i], responses[i + 1]
        assert (out[i] == 1.0).all()
        r_ids, w_ids = tok.encode(right, add_eos=True), tok.encode(wrong, add_eos=True)
        slip = next(j for j, (a, b) in enumerate(zip(r_ids, w_ids, strict=False)) if a != b)
        assert (out[i + 1, :slip] == 1.0).all() and (out[i + 1, slip:] == -1.0).all()
        assert out[i + 1, len(w_ids) - 1] == -1.0  # EOS: the outcome.
        assert (keep[i] == 1.0).all()  # first_slip: every slot of a right answer, ...
        assert (keep[i + 1, : slip + 1] == 1.0).all() and (keep[i + 1, slip + 1 :] == 0.0).all()
        # The slip lies at the wrong number: the tokens before it spell no more than the text
        # both answers share.
        common = os.path.commonprefix([right, wrong])
        assert len(tok.decode(w_ids[:slip]).strip()) <= len(common.strip())
        assert len(tok.decode(w_ids[: slip + 1]).strip()) > len(common.strip())
        routes.add(rollout.is_direct(right))
    assert routes == {True, False}
    assert rm.first_slip(tok, responses[0], responses[0]) is None


def test_response_scores_against_a_loop():
    """reward_model.score: the last real token's score, or the lowest over the real tokens,
    read past right padding (a padded slot holds a score that must not count)."""
    from vcppo_jax.stages import reward_model as rm

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 9)).astype(np.float32)
    lengths = np.array([1, 9, 4, 7, 2, 5])
    mask = (np.arange(9)[None, :] < lengths[:, None]).astype(np.float32)
    scores[mask == 0] = -100.0  # Padding: would win a min it were allowed into.
    last = rm.response_scores(scores, mask, "last_token")
    low = rm.response_scores(scores, mask, "min")
    for i, n in enumerate(lengths):
        assert last[i] == scores[i, n - 1]
        assert low[i] == min(scores[i, j] for j in range(n))
    with pytest.raises(ValueError, match="reward_model.score='mean'"):
        rm.response_scores(scores, mask, "mean")


def test_min_score_finds_a_slip_that_eos_misses():
    """A wrong answer whose scores dip at the slip and recover by EOS is separated by "min"
    and not by "last_token"; ``separation`` counts each route on its own."""
    from vcppo_jax.stages import reward_model as rm

    settings = rm.Settings(4, 0.5, 1.0, -1.0, score="min")
    mask = np.ones((4, 5), np.float32)
    tokens = np.array(
        [
            [0.9, 0.8, 0.9, 0.7, 0.8],  # Right, written.
            [0.9, -0.6, 0.2, 0.4, 0.5],  # Wrong, written: dips at the slip only.
            [0.3, 0.4, 0.2, 0.5, 0.6],  # Right, direct.
            [0.3, 0.4, 0.2, 0.5, 0.6],  # Wrong, direct: scored like the right one.
        ],
        np.float32,
    )
    right = np.array([True, False, True, False])
    written = np.array([True, True, False, False])
    by_min = rm.separation(rm.response_scores(tokens, mask, "min"), right, written, settings)
    by_eos = rm.separation(rm.response_scores(tokens, mask, "last_token"), right, written, settings)
    assert by_min["rm/heldout_accuracy_written"] == 1.0
    assert by_eos["rm/heldout_accuracy_written"] == 0.5
    assert by_min["rm/heldout_accuracy_direct"] == by_eos["rm/heldout_accuracy_direct"] == 0.5
    assert by_min["rm/heldout_accuracy"] == 0.75
    np.testing.assert_allclose(by_min["rm/heldout_margin"], (0.7 + 0.2 - (-0.6) - 0.2) / 2)


def test_class_balanced_weights_give_each_side_half():
    from vcppo_jax.stages import reward_model as rm

    w = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], np.float32)
    wrong = np.array([[0, 0, 0, 0, 0], [0, 0, 1, 0, 1]], bool)  # A padded slot marked too.
    out = rm.class_balanced(w, wrong)
    np.testing.assert_allclose(out.sum(), w.sum())
    np.testing.assert_allclose((out * wrong).sum(), w.sum() / 2)
    np.testing.assert_allclose(out[1, 2], 3.5)
    np.testing.assert_allclose(out[0, 0], 3.5 / 6)
    assert out[0, 4] == out[1, 4] == 0.0  # Unweighted slots stay out.
    np.testing.assert_array_equal(rm.class_balanced(w, np.zeros_like(wrong)), w)
