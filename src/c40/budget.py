"""A wall-clock budget for one training run (`c40 train --time-budget MINUTES`).

Sizing a run's epochs to a time budget before it starts misses on a host whose speed drifts
10-25% between hours (this project's runs sized to an hour ended at 51.5 and 65 minutes). Under
a budget the run sizes itself as it goes: before each epoch it re-plans its epoch count from the
seconds left and what its own epochs and tests have cost so far (an epoch costs the median of
the last five of its size, since one epoch is a noisy sample of the host; a size not trained yet
is priced by pixel count), with the recipe's low-res share and test interval. Its schedule and
low-res phase follow that plan, so it trains the recipe as `--epochs N` would for the N the host
allows. The epoch the plan shows to be the last ends the schedule; if the host slows so much
that even the planned next epoch would not fit, the run ends early. --epochs is the cap. The
clock starts when `fit()` starts (data loading and setup count; the interpreter's imports, ~2-3
s, do not); a resumed run continues from its recorded `elapsed`. Such a run is not
bit-reproducible: its epoch count depends on the host's speed.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

from c40.config import low_res_count

RECENT = 5  # an epoch of a size is priced at the median of the last RECENT at that size
EVAL_COST = 0.5  # seconds of a test view per image / seconds of a training image, before any test is timed


@dataclass
class TimeBudget:
    seconds: float                  # the whole run: setup, epochs, tests, the final test
    epochs: int                     # the plan: epochs of the run (starts at the cap)
    test_share: float               # test images / training images (the untimed test's guess)
    final_views: int                # views the final test evaluates per image (its TTA)
    origin: float = math.nan        # perf_counter() when the run's clock started
    epoch_seconds: dict[int, list[float]] = field(default_factory=dict)  # recent epochs', per px
    view_seconds: float | None = None  # one view of the test set, as last timed

    def start(self, origin: float) -> None:
        self.origin = origin

    def elapsed(self) -> float:
        return time.perf_counter() - self.origin

    def test_seconds(self, views: int) -> float:
        """Expected seconds of a test of `views` views per image."""
        if self.view_seconds is not None:
            return views * self.view_seconds
        last = next(reversed(self.epoch_seconds.values()), [0.0])[-1]
        return views * last * self.test_share * EVAL_COST

    def epoch_cost(self, px: int) -> float:
        """Seconds of an epoch at `px`: the median of the recent ones of that size, else of the
        size timed last, scaled by pixel count."""
        known = px if px in self.epoch_seconds else next(reversed(self.epoch_seconds))
        return statistics.median(self.epoch_seconds[known]) * (px / known) ** 2

    def epoch_done(self, px: int, seconds: float) -> None:
        recent = self.epoch_seconds.pop(px, [])  # re-inserted: the dict's last is the size timed last
        self.epoch_seconds[px] = (recent + [seconds])[-RECENT:]

    def test_done(self, views: int, seconds: float) -> None:
        self.view_seconds = seconds / views

    def plan(self, epoch: int, cap: int, low: tuple[int, float], full_px: int,
             test_every: int, test_views: int) -> int:
        """As `epoch` (0-based) starts: the most epochs (at least epoch + 1, at most `cap`) whose
        rest fits the seconds left with the final test: `low` = (px, share of the epochs trained
        at it), a test of `test_views` views every `test_every` epochs (0: none) before the last.
        Sets and returns `epochs`; before any epoch is timed the plan stays as it is."""
        if not self.epoch_seconds:
            return self.epochs
        low_px, low_frac = low
        left = self.seconds - self.elapsed() - self.test_seconds(self.final_views)
        test = self.test_seconds(test_views)
        n = epoch + 1
        while n < cap:
            e = n + 1
            n_low = max(0, low_res_count(low_frac, e) - epoch)
            tests = (e - 1) // test_every - epoch // test_every if test_every else 0
            cost = (n_low * self.epoch_cost(low_px) + (e - epoch - n_low) * self.epoch_cost(full_px)
                    + tests * test)
            if cost > left:
                break
            n = e
        self.epochs = n
        return n

    def room_for_epoch(self, px: int, test_views: int) -> bool:
        """Whether one more epoch at `px`, a test of `test_views` views before it (0: none due)
        and the final test still end inside the budget."""
        need = self.epoch_cost(px) + self.test_seconds(test_views) + self.test_seconds(self.final_views)
        return self.elapsed() + need <= self.seconds
