"""Summaries, figures and seeds at sizes where one row or curve per participant stops
helping: distributions instead."""

import math

import numpy as np
import pyarrow as pa
import pytest

from fedmd_ray import seeds
from fedmd_ray.config import from_dict
from fedmd_ray.phases import Phase
from fedmd_ray.report import MANY, SummaryRow, plot_accuracy, render_summary
from fedmd_ray.results import SCHEMA


def _row(
    name: str,
    lower: float,
    final: float,
    last3: float | None = None,
    best: float | None = None,
    upper: float = 0.9,
) -> SummaryRow:
    return SummaryRow(
        participant=name,
        model="cnn2:4,8,0.0",
        parameters=1000,
        adversary=False,
        lower_bound=lower,
        fedmd_final=final,
        fedmd_best=final if best is None else best,
        fedmd_last3=final if last3 is None else last3,
        upper_bound=upper,
        gain=final - lower,
        bytes_per_round=100.0,
        fedavg_bytes_per_round=8000,
    )


def _summary(n: int, rng) -> list[SummaryRow]:
    lower = rng.uniform(0.3, 0.6, n)
    final = lower + rng.uniform(0.05, 0.3, n)
    return [_row(f"p{i:05d}", float(lower[i]), float(final[i])) for i in range(n)]


def test_a_summary_of_many_participants_shows_their_distribution(tmp_path):
    rng = np.random.default_rng(0)
    n = 5 * MANY
    summary = _summary(n, rng)
    text = render_summary(summary, from_dict({"participants": n}))
    assert f"*median of {n}*" in text and "p00007" not in text
    gains = sorted(r.gain for r in summary)
    median_row = next(line for line in text.splitlines() if "*median of" in line)
    assert f"{100 * np.median(gains):+.1f}" in median_row
    mean_row = next(line for line in text.splitlines() if line.startswith("| **mean**"))
    assert f"{100 * np.mean(gains):+.1f}" in mean_row
    rows = [
        dict.fromkeys(SCHEMA.names)
        | {"round": r, "participant": s.participant, "phase": Phase.EVALUATE, "accuracy": s.fedmd_final}
        for r in (1, 2)
        for s in summary
    ]
    plot_accuracy(pa.Table.from_pylist(rows, schema=SCHEMA), summary, tmp_path / "a.png", "many")
    assert (tmp_path / "a.png").stat().st_size > 10_000


def test_seeds_report_mean_and_standard_deviation(tmp_path):
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.02), (2, 0.04)):
        summary = [
            _row("p00", 0.5, 0.7 + shift, best=0.72 + shift, upper=0.8),
            _row("p01", 0.6, 0.75, last3=0.74, best=0.76, upper=0.85),
        ]
        curves = {"p00": {0: 0.5, 1: 0.6, 2: 0.7 + shift}, "p01": {0: 0.6, 1: 0.5, 2: 0.75}}
        runs.append({"seed": seed, "summary": summary, "curves": curves})
    agg = seeds.aggregate(runs)
    mean, std = agg["participants"][0]["gain"]
    assert math.isclose(mean, 0.22) and math.isclose(std, 0.02)  # sample std of 0.20, 0.22, 0.24
    assert agg["participants"][1]["gain"] == pytest.approx((0.15, 0.0))
    overall_mean, _ = agg["overall"]["gain"]
    assert math.isclose(overall_mean, np.mean([(0.2 + s + 0.15) / 2 for s in (0, 0.02, 0.04)]))
    # p01 drops from 0.6 to 0.5 in round 1 (the mean from 0.55 to 0.55: no drop); nobody ends below its lower bound
    assert all(c["below_lower_bound"] == [] for c in agg["checks"])
    assert all(math.isclose(c["largest_drop"], 0.0, abs_tol=1e-12) for c in agg["checks"])
    text = seeds.render(agg, "t")
    assert "22.0 ± 2.0" in text and "3 seeds" in text
    seeds.plot(runs, agg, tmp_path / "f.png", "t")
    assert (tmp_path / "f.png").stat().st_size > 10_000


def test_a_summary_says_when_its_numbers_do_not_repeat():
    rows = [_row("p00", 0.5, 0.6)]
    assert "Not repeatable" not in render_summary(rows, from_dict({}))
    deadline = render_summary(rows, from_dict({"resources": {"deadline_s": 5.0, "quorum": 0.5}}))
    assert "**Not repeatable**: who answers in time" in deadline
    secret = from_dict({"sharing": {"clip": 1.0, "noise_multiplier": 1.0, "noise_seed": "secret"}})
    assert "operating system's entropy" in render_summary(rows, secret)
