"""`schedule`: the learning-rate warm-up cap and the linear and cosine schedules against their formulas."""

import pytest


def test_warmup_is_capped_at_a_tenth_of_a_short_run():
    import torch

    from igdrec.schedule import effective_warmup, make_scheduler

    assert effective_warmup(20, 2000) == 20
    assert effective_warmup(20, 32) == 3
    assert effective_warmup(20, 2) == 1
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = make_scheduler(optimizer, "cosine", effective_warmup(20, 2), 2, 0.1)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 1.0  # the second of two steps runs at the peak, not at 1/20 of it


@pytest.mark.parametrize("schedule, expected", [
    # 4 warm-up steps of 20, peak 1: warm-up s/4, then linear (20 - s) / 16 ...
    ("linear", {0: 0.0, 2: 0.5, 4: 1.0, 8: 0.75, 12: 0.5, 16: 0.25, 19: 1 / 16, 20: 0.0}),
    # ... or 0.1 + 0.9 · (1 + cos(π (s - 4) / 16)) / 2: cos(π/4) = 0.70711 at s = 8, cos(3π/4) = -0.70711 at s = 16
    ("cosine", {0: 0.0, 2: 0.5, 4: 1.0, 8: 0.1 + 0.45 * (1 + 0.7071068), 12: 0.55, 16: 0.1 + 0.45 * (1 - 0.7071068), 20: 0.1}),
])
def test_learning_rate_schedules_follow_their_formulas(schedule, expected):
    import torch

    from igdrec.schedule import make_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = make_scheduler(optimizer, schedule, 4, 20, 0.1)
    seen = {}
    for step in range(21):
        seen[step] = optimizer.param_groups[0]["lr"]  # the rate optimiser step `step` runs at
        optimizer.step()
        scheduler.step()
    for step, lr in expected.items():
        assert seen[step] == pytest.approx(lr, abs=1e-6), (schedule, step)
