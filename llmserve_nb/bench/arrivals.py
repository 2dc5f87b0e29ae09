"""Open-loop arrival schedules: Poisson, or gamma with a burstiness, seeded so every server sees the same one."""
from __future__ import annotations

import math
import random
from typing import Literal

Arrival = Literal["poisson", "gamma"]
ARRIVALS = ("poisson", "gamma")


def arrival_times(n: int, rate: float, arrival: Arrival = "poisson", burstiness: float = 1.0,
                  seed: int = 0) -> list[float]:
    """Send times (seconds from the start of the run) of `n` requests at `rate` req/s on average.

    The first request goes at 0; the gaps after it are independent draws:
    - "poisson": exponential gaps of mean 1/rate (coefficient of variation 1);
    - "gamma": gamma gaps with shape = `burstiness` and scale = 1/(rate * burstiness), vLLM's
      `--burstiness`: the mean gap stays 1/rate and the coefficient of variation is 1/sqrt(burstiness),
      so burstiness < 1 sends bursts separated by lulls and > 1 evens the gaps out. Burstiness 1 is the
      Poisson process, and it draws exactly the Poisson schedule of the same seed.
    """
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}, got {arrival!r}")
    if not 0 < rate < math.inf:
        raise ValueError(f"rate must be > 0 req/s, got {rate}")
    if not 0 < burstiness < math.inf:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if arrival == "poisson" and burstiness != 1.0:
        raise ValueError(f"burstiness {burstiness} needs arrival='gamma' (Poisson arrivals have burstiness 1)")
    rng = random.Random(seed)
    times, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate) if burstiness == 1.0 else rng.gammavariate(burstiness, 1 / (rate * burstiness))
        times.append(t)
    return times
