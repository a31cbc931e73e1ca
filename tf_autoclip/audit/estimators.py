"""ε lower bounds from canaries: one-run guesses, Gaussian scores, thresholded trials.

Three estimators, from the weakest assumptions to the strongest:

- ``one_run_epsilon``: Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training
  Run" (NeurIPS 2023, arXiv 2305.08846). ``m`` canaries, each included independently with
  probability 1/2 in one run; the auditor guesses the membership of ``r`` of them and is
  right ``v`` times. Under (ε, δ)-DP, ``P[≥ v correct] ≤ β + 2mδ·α`` with
  ``q = e^ε / (1 + e^ε)``, ``β = P[Binomial(r, q) ≥ v]`` and
  ``α = max_{1≤i≤v} P[v - i ≤ Binomial(r, q) < v] / i`` (their Theorem 5.2 / Algorithm 2).
  A rigorous bound: it holds at the stated confidence for any mechanism and any scores.
- ``threshold_epsilon``: many independent trials on D and on D ∪ {canary}; a threshold
  test chosen on half of them, its error rates bounded with Clopper-Pearson on the other
  half (Jagielski et al. 2020). Rigorous too.
- ``gdp_epsilon``: Nasr et al., "Tight Auditing of Differentially Private Machine Learning"
  (USENIX Security 2023, arXiv 2302.07956): model the scores of included and excluded
  canaries as Gaussians of equal variance, so the mechanism looks μ-GDP with
  ``μ = (mean_in - mean_out) / std`` (Dong, Roth & Su 2019); a lower confidence bound on μ
  becomes ε at δ. An *estimate*: it is only as good as the Gaussian model of the scores
  (which holds for white-box gradient canaries in DP-SGD, where the noise is Gaussian).

Scores are oriented so that included canaries score *higher*; negate them otherwise.

    >>> round(one_run_epsilon(1000, 100, 100, delta=1e-5), 3)
    3.465
    >>> one_run_epsilon(1000, 100, 50, delta=1e-5)
    0.0
    >>> round(gdp_epsilon_from_mu(1 / 1.5, 1e-5), 3)  # one Gaussian release, sigma 1.5
    2.753
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from scipy import optimize, special, stats

__all__ = [
    "clopper_pearson_upper",
    "epsilon_from_error_rates",
    "gdp_delta",
    "gdp_epsilon",
    "gdp_epsilon_from_mu",
    "gdp_mu_lower_bound",
    "one_run_epsilon",
    "one_run_epsilon_from_scores",
    "one_run_p_value",
    "threshold_epsilon",
]


# -- argument checks -------------------------------------------------------------------
def _count(name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}.")
    return int(value)


def _unit_interval(name: str, value, *, closed_low: bool) -> float:
    x = float(value)
    if not (0.0 <= x < 1.0 if closed_low else 0.0 < x < 1.0):
        interval = "[0, 1)" if closed_low else "(0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}.")
    return x


def _scores(name: str, values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"{name} needs at least 2 scores, got {x.size}.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite (no NaN or inf).")
    return x


def _largest_rejected(p_value, significance: float, tol: float = 1e-9) -> float:
    """Largest ε ≥ 0 with ``p_value(ε) < significance`` (bisection on a crossing)."""
    if p_value(0.0) >= significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(hi) < significance:
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:  # p stays below the significance: any ε is rejected
            return math.inf
    while hi - lo > tol * max(1.0, lo):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p_value(mid) < significance else (lo, mid)
    return lo


# -- Steinke, Nasr & Jagielski (2023): one training run -----------------------------------
def one_run_p_value(
    num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float
) -> float:
    """Largest probability of ``≥ num_correct`` right guesses under (ε, δ)-DP.

    ``β + 2·m·δ·α`` of Steinke et al. (2023), capped at 1; see the module docstring.
    """
    m, r, v = num_canaries, num_guesses, num_correct
    q = float(special.expit(epsilon))  # accuracy of ε-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    # P[v - i <= Binomial(r, q) < v] for i = 1..v, divided by i.
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(beta + 2.0 * m * delta * alpha, 1.0)


def one_run_epsilon(
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """ε lower bound of a one-run audit (Steinke, Nasr & Jagielski 2023).

    The largest ε such that ``num_correct`` or more right guesses out of ``num_guesses``
    (about ``num_canaries`` canaries, each included independently with probability 1/2)
    has probability below ``1 - confidence`` under every (ε, δ)-DP mechanism: the mechanism
    is not (ε, δ)-DP for any smaller ε, at that confidence. 0 if nothing is rejected.

    Args:
        num_canaries: m, canaries randomized (guessed or not).
        num_guesses: r ≤ m, canaries whose membership the auditor guessed (the others
            abstained). Which ones may depend on the output, not on the membership.
        num_correct: v ≤ r, right guesses.
        delta: δ of the claim, in [0, 1).
        confidence: in (0, 1); 0.95 rejects at p < 0.05.
    """
    m = _count("num_canaries", num_canaries, low=1)
    r = _count("num_guesses", num_guesses)
    v = _count("num_correct", num_correct)
    if r > m:
        raise ValueError(f"num_guesses ({r}) must be <= num_canaries ({m}).")
    if v > r:
        raise ValueError(f"num_correct ({v}) must be <= num_guesses ({r}).")
    d = _unit_interval("delta", delta, closed_low=True)
    significance = 1.0 - _unit_interval("confidence", confidence, closed_low=False)
    return _largest_rejected(lambda eps: one_run_p_value(m, r, v, eps, d), significance)


def one_run_epsilon_from_scores(
    scores,
    included,
    delta: float,
    num_guesses=None,
    confidence: float = 0.95,
) -> tuple[float, int, int]:
    """One-run ε from canary scores: guess the highest "in", the lowest "out".

    For each ``k`` in ``num_guesses`` (default: 2, 5, 10, 20, 50 and 100% of the canaries),
    the ``ceil(k/2)`` highest-scoring canaries are guessed included and the ``floor(k/2)``
    lowest excluded. The best ``k`` is kept with a Bonferroni correction (each ``k`` tested
    at confidence ``1 - (1 - confidence) / len(num_guesses)``), so the bound holds at
    ``confidence``. Returns ``(epsilon, guesses, correct)`` of the best ``k``.
    """
    s = _scores("scores", scores)
    member = np.asarray(included, dtype=bool).ravel()
    if member.shape != s.shape:
        raise ValueError(f"included has {member.size} entries for {s.size} scores.")
    m = s.size
    if num_guesses is None:
        num_guesses = sorted({max(2, round(f * m)) for f in (0.02, 0.05, 0.1, 0.2, 0.5, 1)})
    ks = [_count("num_guesses", k, low=1) for k in np.atleast_1d(num_guesses)]
    if max(ks) > m:
        raise ValueError(f"num_guesses must be <= the number of canaries ({m}), got {ks}.")
    level = 1.0 - (1.0 - _unit_interval("confidence", confidence, closed_low=False)) / len(ks)
    order = member[np.argsort(s, kind="stable")]  # membership, lowest score first
    best = (0.0, ks[0], 0)
    for k in ks:
        n_in, n_out = (k + 1) // 2, k // 2
        correct = int(np.sum(order[m - n_in :]) + np.sum(~order[:n_out]))
        eps = one_run_epsilon(m, k, correct, delta, level)
        if eps > best[0]:
            best = (eps, k, correct)
    return best


# -- Clopper-Pearson bounds on a threshold test's error rates (many trials) -------------
def clopper_pearson_upper(k, n: int, alpha: float) -> np.ndarray:
    """One-sided ``1 - alpha`` upper confidence bound on a rate from ``k`` of ``n``.

    >>> round(float(clopper_pearson_upper(0, 1000, 0.05)), 6)  # 1 - 0.05^(1/1000)
    0.002991
    """
    k = np.asarray(k, dtype=np.float64)
    upper = stats.beta.ppf(1.0 - alpha, k + 1.0, np.maximum(n - k, 1e-12))
    return np.where(k >= n, 1.0, upper)


def epsilon_from_error_rates(fp, fn, n_out: int, n_in: int, delta: float, alpha: float):
    """ε lower bound from false positives among ``n_out`` trials on D, false negatives
    among ``n_in`` on D' = D ∪ {canary}.

    Any (ε, δ)-DP mechanism has ``FPR + e^ε FNR ≥ 1 - δ`` and ``FNR + e^ε FPR ≥ 1 - δ``;
    with Clopper-Pearson upper bounds at ``1 - alpha`` on both rates (jointly at
    ``1 - 2·alpha``), ``ε ≥ max(log((1 - δ - FNR⁺) / FPR⁺), log((1 - δ - FPR⁺) / FNR⁺))``.
    """
    fpr = clopper_pearson_upper(fp, n_out, alpha)
    fnr = clopper_pearson_upper(fn, n_in, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log(np.maximum(1.0 - delta - fnr, 0.0) / fpr)
        two = np.log(np.maximum(1.0 - delta - fpr, 0.0) / fnr)
    return np.maximum(np.maximum(one, two), 0.0)


def _errors(scores_out, scores_in, thresholds, canary_high):
    """Counts of false positives (D called D') and false negatives, per threshold."""
    out_above = len(scores_out) - np.searchsorted(np.sort(scores_out), thresholds, "right")
    in_above = len(scores_in) - np.searchsorted(np.sort(scores_in), thresholds, "right")
    if canary_high:  # guess "canary present" when s > threshold
        return out_above, len(scores_in) - in_above
    return len(scores_out) - out_above, in_above


def threshold_epsilon(
    out_scores, in_scores, delta: float, alpha: float = 0.025, num_thresholds: int = 399
) -> float:
    """ε lower bound of a threshold test over independent trials on D and on D'.

    The threshold (among ``num_thresholds`` quantiles of the first half of the pooled
    scores) and the test's direction are chosen on the first half of each array; the error
    rates are counted on the second half and bounded by ``epsilon_from_error_rates`` at
    ``alpha`` each (jointly ``1 - 2·alpha`` confidence: 95% by default).
    """
    scores_out, scores_in = _scores("out_scores", out_scores), _scores("in_scores", in_scores)
    half_out, half_in = len(scores_out) // 2, len(scores_in) // 2
    cal_out, test_out = scores_out[:half_out], scores_out[half_out:]
    cal_in, test_in = scores_in[:half_in], scores_in[half_in:]
    pooled = np.concatenate([cal_out, cal_in])
    thresholds = np.quantile(pooled, np.linspace(0.0, 1.0, num_thresholds + 2)[1:-1])
    best = (-1.0, None, None)
    for canary_high in (True, False):
        fp, fn = _errors(cal_out, cal_in, thresholds, canary_high)
        eps = epsilon_from_error_rates(fp, fn, len(cal_out), len(cal_in), delta, alpha)
        i = int(np.argmax(eps))
        if eps[i] > best[0]:
            best = (float(eps[i]), thresholds[i], canary_high)
    _, threshold, canary_high = best
    fp, fn = _errors(test_out, test_in, np.array([threshold]), canary_high)
    rates = epsilon_from_error_rates(fp, fn, len(test_out), len(test_in), delta, alpha)
    return float(rates[0])


# -- Nasr et al. (2023): Gaussian scores, μ-GDP -----------------------------------------
def gdp_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of μ-GDP: ``Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2)`` (Dong, Roth & Su 2019).

    >>> round(gdp_delta(0.0, 1.0), 6) == round(2 * float(stats.norm.cdf(0.5)) - 1, 6)
    True
    """
    if mu <= 0:
        return 0.0
    a = stats.norm.logcdf(-epsilon / mu + mu / 2)
    b = epsilon + stats.norm.logcdf(-epsilon / mu - mu / 2)
    return float(np.exp(a) * -np.expm1(min(b - a, 0.0)))  # e^a - e^b, stably


def gdp_epsilon_from_mu(mu: float, delta: float) -> float:
    """Smallest ε with ``gdp_delta(ε, μ) ≤ δ``: μ-GDP as (ε, δ)-DP (0 if already at ε=0)."""
    d = _unit_interval("delta", delta, closed_low=False)
    if not math.isfinite(mu) or mu < 0:
        raise ValueError(f"mu must be finite and >= 0, got {mu!r}.")
    if gdp_delta(0.0, mu) <= d:
        return 0.0
    log_d = math.log(d)

    def gap(eps: float) -> float:
        a = stats.norm.logcdf(-eps / mu + mu / 2)
        b = eps + stats.norm.logcdf(-eps / mu - mu / 2)
        return float(a + np.log(-np.expm1(min(b - a, 0.0))) - log_d)

    hi = 1.0
    while gap(hi) > 0:
        hi *= 2.0
    return float(optimize.brentq(gap, 0.0, hi, xtol=1e-10))


def gdp_mu_lower_bound(in_scores, out_scores, confidence: float = 0.95) -> tuple[float, float]:
    """``(μ̂, μ_lower)``: the standardized mean difference of the scores and its lower
    confidence bound, assuming both are Gaussian with one common variance.

    ``μ̂ = (mean_in - mean_out) / s`` with ``s`` the pooled standard deviation. The bound is
    exact under that model: ``t = μ̂ / sqrt(1/n_in + 1/n_out)`` has a noncentral t
    distribution with ``n_in + n_out - 2`` degrees of freedom and noncentrality
    ``μ·sqrt(n_in·n_out / (n_in + n_out))``, inverted at ``confidence``. ``μ_lower`` is 0
    when no positive μ is supported.
    """
    x_in, x_out = _scores("in_scores", in_scores), _scores("out_scores", out_scores)
    level = _unit_interval("confidence", confidence, closed_low=False)
    n_in, n_out = x_in.size, x_out.size
    df = n_in + n_out - 2
    pooled = (np.sum((x_in - x_in.mean()) ** 2) + np.sum((x_out - x_out.mean()) ** 2)) / df
    if pooled <= 0:
        raise ValueError("The scores have zero variance: μ is undefined.")
    mu_hat = float((x_in.mean() - x_out.mean()) / math.sqrt(pooled))
    scale = math.sqrt(n_in * n_out / (n_in + n_out))
    t_obs = mu_hat * scale

    def excess(noncentrality: float) -> float:  # P[T <= t_obs] - level, decreasing
        return float(stats.nct.cdf(t_obs, df, noncentrality)) - level

    if excess(0.0) <= 0:
        return mu_hat, 0.0
    # The root is about ``t_obs - z·spread``; bracket it closely (scipy's noncentral t is
    # unreliable, even NaN, tens of spreads into its tail).
    spread = math.sqrt(1.0 + t_obs**2 / (2.0 * df))
    hi = t_obs + 4.0 * spread
    while excess(hi) > 0:
        hi += 4.0 * spread
    return mu_hat, float(optimize.brentq(excess, 0.0, hi, xtol=1e-10)) / scale


def gdp_epsilon(in_scores, out_scores, delta: float, confidence: float = 0.95) -> float:
    """ε at δ of the lower confidence bound on μ (``gdp_mu_lower_bound``), Nasr et al. 2023.

    Scores of canaries that were included (``in_scores``) and excluded (``out_scores``),
    included ones expected higher. An estimate under a Gaussian model of the scores, not a
    proof; see the module docstring.
    """
    _, mu_lower = gdp_mu_lower_bound(in_scores, out_scores, confidence)
    return gdp_epsilon_from_mu(mu_lower, delta)
