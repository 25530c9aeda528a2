"""The Train tab's progress bar: the ETA a user reads while a run trains."""
from __future__ import annotations

from app.train_tab import progress, progress_html


def rows_like_the_h200_launcher_run(total: int = 300):
    # metrics.jsonl of the 1-GPU launcher run (bench/results/logs/h200_launcher_1gpu.log): the
    # first step compiles the layers (51.3 s), every later step takes ~0.8 s
    elapsed = [51.3, 52.11, 52.91, 53.7, 54.5, 55.3]
    return [{"kind": "train", "step": i + 1, "total_steps": total, "elapsed_s": e, "loss": 12.7,
             "tokens_per_s": 23000.0} for i, e in enumerate(elapsed)]


def test_eta_follows_the_steady_step_time_not_the_compiling_first_step():
    p = progress(rows_like_the_h200_launcher_run())
    assert p["step"] == 6 and p["total"] == 300
    assert 0.75 * 294 <= p["eta_s"] <= 0.85 * 294  # ~4 minutes, not 294 x 9.2 s (45 minutes)
    assert "ETA 3m" in progress_html(p, "running")


def test_eta_after_one_step_and_with_an_eval_between_steps():
    one = progress(rows_like_the_h200_launcher_run()[:1])
    assert one["eta_s"] == 51.3 * 299  # all there is to go on
    rows = rows_like_the_h200_launcher_run()
    rows.insert(3, {"kind": "eval", "step": 3, "eval_loss": 12.6, "elapsed_s": 53.0})
    rows[4:] = [dict(r, elapsed_s=r["elapsed_s"] + 20) for r in rows[4:]]  # a 20 s eval
    p = progress(rows)
    assert p["eval_loss"] == 12.6
    assert p["eta_s"] < 1.0 * 294  # one slow step does not move the median


def test_eta_across_a_resume():
    # a resumed run carries elapsed_s on from its checkpoint; the rows before the crash that the
    # checkpoint did not cover are gone from metrics.jsonl
    rows = rows_like_the_h200_launcher_run()[:4]
    rows += [{"kind": "train", "step": s, "total_steps": 300, "elapsed_s": e, "loss": 12.6, "tokens_per_s": 1.0}
             for s, e in [(5, 110.0), (6, 110.8), (7, 111.6)]]
    p = progress(rows)
    assert 0.75 * 293 <= p["eta_s"] <= 0.85 * 293
