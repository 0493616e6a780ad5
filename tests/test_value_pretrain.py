"""Value pretraining's plateau rule, against a plain loop, and in a resumed run."""

import numpy as np
import pytest

from tests.test_runner import rows, run_main
from vcppo_jax.stages.value_pretrain import StopRule, plateau_gains, plateaued


def _reference_stop(losses, evs, window, tol):
    """The first step count after which the rule holds, by explicit sums (None: never)."""
    for n in range(1, len(losses) + 1):
        if n < 2 * window:
            continue
        b_loss = sum(losses[n - 2 * window : n - window]) / window
        l_loss = sum(losses[n - window : n]) / window
        b_ev = sum(evs[n - 2 * window : n - window]) / window
        l_ev = sum(evs[n - window : n]) / window
        if (b_loss - l_loss) / abs(b_loss) < tol and l_ev - b_ev < tol:
            return n
    return None


@pytest.mark.parametrize("window,tol", [(3, 0.05), (5, 0.01), (2, 0.02)])
def test_plateau_rule_matches_a_plain_loop(window, tol):
    rng = np.random.default_rng(window)
    k = np.arange(80)
    losses = list(0.3 + 0.5 * 0.9**k + 0.01 * rng.standard_normal(80))  # Converging, noisy.
    evs = list(0.6 * (1 - 0.92**k) + 0.01 * rng.standard_normal(80))
    want = _reference_stop(losses, evs, window, tol)
    rule = StopRule("plateau", window, tol)
    history = [[a, b] for a, b in zip(losses, evs, strict=True)]
    got = next((n for n in range(1, 81) if plateaued(history[:n], rule)), None)
    assert want is not None and 2 * window < want < 80
    assert got == want
    assert not plateaued(history[:want], StopRule("steps", window, tol))  # Fixed-step rule.
    assert plateau_gains(history[: 2 * window - 1], window) is None


def test_a_run_stops_value_pretraining_on_the_plateau_across_a_resume(tmp_path):
    """window 2 and a tolerance every gain is under: value pretraining ends after 4 of its 6
    steps. Interrupted after its second step, the resumed run must still stop after the
    fourth: the per-step history lives in the checkpoint."""
    wd = str(tmp_path / "vp")
    flags = [
        "--config.value_pretrain.steps=6",
        "--config.value_pretrain.until=plateau",
        "--config.value_pretrain.plateau_window=2",
        "--config.value_pretrain.plateau_tol=1e9",
    ]
    first = run_main(wd, *flags, "--config.stop_after_steps=8")  # 6 SFT steps, 2 VP steps.
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_main(wd, *flags)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "value pretraining converged after step 4" in second.stderr
    vp = [r for r in rows(wd) if r["stage"] == "value_pretrain"]
    assert [r["step"] for r in vp] == [0, 1, 2, 3]
    assert "critic/plateau_loss_gain" not in vp[2] and "critic/plateau_ev_gain" in vp[3]
    assert sum(r["stage"] == "ppo" for r in rows(wd)) == 3
