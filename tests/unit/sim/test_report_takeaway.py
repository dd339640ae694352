"""The report's one-line takeaway: who wins at which load, and why, from the records."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sim.report import takeaway
from sim.report.records import RunRecords, summary_from_frame


def records(ttft_s, prompt_tokens, queued_s=None) -> pd.DataFrame:
    """One request a second; ``queued_s`` of each TTFT waits on the instance, the rest prefills."""
    n = len(ttft_s)
    arrival = np.arange(n, dtype=float)
    ttft = np.asarray(ttft_s, dtype=float)
    queued = np.zeros(n) if queued_s is None else np.asarray(queued_s, dtype=float)
    return pd.DataFrame(
        {
            "arrival_s": arrival,
            "dispatch_s": arrival,
            "prefill_start_s": arrival + queued,
            "first_token_s": arrival + ttft,
            "finish_s": arrival + ttft + 0.5,
            "prompt_tokens": prompt_tokens,
            "output_tokens": [6] * n,
        }
    )


def run(label: str, load: float, frame: pd.DataFrame, slo_ttft_s: float | None = 1.0):
    summary = summary_from_frame(frame, slo_ttft_s, None)
    return RunRecords(label, load, 0, "x", None, frame, summary)  # type: ignore[arg-type]


FAST = records([0.2] * 10, [2000] * 6 + [100] * 4)
# Six long prompts late (3 s, 2.5 s of it queued on the instance), four short ones in time.
SLOW = records([3.0] * 6 + [0.2] * 4, [2000] * 6 + [100] * 4, [2.5] * 6 + [0.0] * 4)
HALF = records([3.0] * 5 + [0.2] * 5, [100] * 10, [0.1] * 5 + [0.0] * 5)


def test_names_the_winner_of_each_load_and_why_the_runner_up_misses():
    runs = [run("fast", 1.0, FAST), run("slow", 1.0, SLOW), run("fast", 2.0, HALF)]
    runs.append(run("slow", 2.0, FAST))
    line = takeaway(runs)
    assert line.startswith("On SLO attainment, fast wins at ×1, slow at ×2"), line
    # The widest lead (60 points at ×1 against 50 at ×2) is the one explained.
    assert "(at ×1: 100.0% against slow's 40.0%)" in line, line
    assert "slow misses the SLO on 6 requests to fast's 0" in line, line
    assert "100% of them long prompts (>\u00a0256 uncached tokens)" in line, line
    assert "83% of their TTFT queued on an instance (median TTFT 3.0 s)" in line, line
    assert line.count("\n") == 0 and line.endswith(".")


def test_short_misses_waiting_in_prefill_are_named_so():
    line = takeaway([run("a", 1.0, FAST), run("b", 1.0, HALF)])
    assert "b misses the SLO on 5 requests to a's 0, 100% of them short prompts" in line
    assert "97% of their TTFT prefilling" in line, line


def test_the_split_follows_the_reports_short_prompt_threshold():
    line = takeaway([run("a", 1.0, FAST), run("b", 1.0, SLOW)], short_prompt_tokens=4096)
    assert "100% of them short prompts (≤\u00a04,096 uncached tokens)" in line, line


def test_a_tie_at_every_load_names_both_and_explains_nothing():
    line = takeaway([run("a", 1.0, FAST), run("b", 1.0, FAST)])
    assert line == "On SLO attainment, a and b tie at ×1."


def test_without_an_slo_the_lowest_p90_ttft_wins():
    runs = [run("a", 1.0, FAST, None), run("b", 1.0, SLOW, None)]
    line = takeaway(runs)
    assert line.startswith("On p90 TTFT, a wins at ×1 (at ×1: 200 ms against b's 3.0 s)"), line


def test_one_policy_is_described_not_compared():
    line = takeaway([run("a", 1.0, FAST), run("a", 2.0, HALF)])
    assert line == "a alone, nothing to compare: SLO attainment ×1 100.0%, ×2 50.0%."
    assert takeaway([]) == ""


def banded(label: str, frame: pd.DataFrame, lo: float, hi: float):
    r = run(label, 1.0, frame)
    r.summary |= {"slo_attainment_lo": lo, "slo_attainment_hi": hi}
    return r


def test_a_lead_that_holds_at_both_ends_of_the_band_is_called_robust():
    line = takeaway([banded("fast", FAST, 1.0, 0.9), banded("slow", SLOW, 0.5, 0.3)])
    assert line.endswith("; the lead holds with step costs scaled down and up (its band)."), line


def test_a_lead_lost_at_one_end_of_the_band_is_called_not_robust():
    line = takeaway([banded("fast", FAST, 1.0, 0.2), banded("slow", SLOW, 0.5, 0.3)])
    assert line.endswith(
        "within its band the lead is not robust: with step costs scaled, slow reaches "
        "30.0% against 20.0%."
    ), line
