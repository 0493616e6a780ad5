"""The frozen-feature probe of right vs wrong answers (experiments/rm_probe.py)."""

import numpy as np

from experiments.rm_probe import fit_logistic, predict
from vcppo_jax.data.synthetic import AdditionTask
from vcppo_jax.rewards import extract_answer
from vcppo_jax.stages import reward_model


def test_logistic_fit_is_the_regularised_optimum_and_separates_what_is_separable():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5)) * [1.0, 3.0, 0.1, 1.0, 10.0] + [0, 5, 0, -2, 0]
    y = x[:, 1] - 5 + 0.5 * rng.normal(size=400) > 0.3 * (x[:, 0])
    l2 = 1e-2
    mean, scale, w, b = fit_logistic(x, y, l2=l2)
    z = (x - mean) / scale
    p = 1 / (1 + np.exp(-(z @ w + b)))
    # First-order optimality of mean log-loss + l2/2 |w|^2 (the bias not penalised).
    np.testing.assert_allclose(z.T @ (p - y) / len(y) + l2 * w, 0.0, atol=1e-6)
    assert abs(np.mean(p - y)) < 1e-6
    assert np.mean(predict((mean, scale, w, b), x) == y) > 0.9
    # Labels independent of the features: no better than chance on fresh data.
    y_rand = rng.random(400) < 0.5
    model = fit_logistic(x, y_rand)
    x_new = rng.normal(size=(4000, 5)) * [1.0, 3.0, 0.1, 1.0, 10.0] + [0, 5, 0, -2, 0]
    assert abs(np.mean(predict(model, x_new) == (rng.random(4000) < 0.5)) - 0.5) < 0.05


def test_answered_four_ways_is_right_and_wrong_on_each_route():
    task = AdditionTask(num_terms=5, digits=1, labels=True)
    problems = task.problems(6, 3)
    prompts, responses, right, written = reward_model.answered_four_ways(
        task, problems, np.random.default_rng(1)
    )
    assert len(prompts) == 24 and right.tolist() == [True, False] * 12
    assert written.tolist() == [True, True, False, False] * 6
    for i, p in enumerate(problems):
        good_w, bad_w, good_d, bad_d = responses[4 * i : 4 * i + 4]
        assert prompts[4 * i] == p.prompt
        assert good_w == p.full_solution and good_d == p.direct_solution
        assert extract_answer(good_w) == p.answer == extract_answer(good_d)
        assert extract_answer(bad_w) != p.answer and extract_answer(bad_d) != p.answer
