"""Empirical privacy auditing: lower bounds on ε from canaries (``docs/privacy.md#auditing``).

- ``one_run_epsilon(num_canaries, num_guesses, num_correct, delta, confidence=0.95)``:
  Steinke, Nasr & Jagielski (NeurIPS 2023): one training run, canaries included with
  probability 1/2, membership guesses counted. ``one_run_epsilon_from_scores`` makes the
  guesses from scores.
- ``gdp_epsilon(in_scores, out_scores, delta, confidence=0.95)``: Nasr et al. (USENIX
  Security 2023): μ-GDP fitted to Gaussian scores, as ε at δ.
- ``threshold_epsilon(out_scores, in_scores, delta)``: a threshold test over many trials,
  Clopper-Pearson bounds on its error rates.
- ``gradient_canary_audit(optimizer_fn, num_canaries, delta)``: inserts white-box gradient
  canaries into a Keras training run of the library, scores them and bounds ε;
  ``gradient_canary_scores`` gives the scores alone.

A lower bound above the ε your accountant claims means the implementation (or the claim)
is broken; one below it is consistent with the claim, never a proof of it.
"""

from tf_autoclip.audit.canaries import (
    AuditResult,
    CanaryScores,
    canary_loss,
    gradient_canary_audit,
    gradient_canary_model,
    gradient_canary_scores,
)
from tf_autoclip.audit.estimators import (
    clopper_pearson_upper,
    epsilon_from_error_rates,
    gdp_delta,
    gdp_epsilon,
    gdp_epsilon_from_mu,
    gdp_mu_lower_bound,
    one_run_epsilon,
    one_run_epsilon_from_scores,
    one_run_p_value,
    threshold_epsilon,
)

__all__ = [
    "AuditResult",
    "CanaryScores",
    "canary_loss",
    "clopper_pearson_upper",
    "epsilon_from_error_rates",
    "gdp_delta",
    "gdp_epsilon",
    "gdp_epsilon_from_mu",
    "gdp_mu_lower_bound",
    "gradient_canary_audit",
    "gradient_canary_model",
    "gradient_canary_scores",
    "one_run_epsilon",
    "one_run_epsilon_from_scores",
    "one_run_p_value",
    "threshold_epsilon",
]
