r"""Empirical privacy audit of DP-SGD: a lower bound on ε from gradient canaries.

One training run of ``--steps`` full-batch DP-SGD steps with ``--num_canaries`` white-box
gradient canaries, each inserted with probability 1/2 (``tf_autoclip.audit``; the
construction is in ``tf_autoclip/audit/canaries.py``). The audit then guesses which
canaries were inserted from their scores and turns the count of right guesses into a
lower bound on ε that holds with ``--confidence`` (Steinke, Nasr & Jagielski 2023); it also
prints the Gaussian-model estimate of Nasr et al. (2023).

The claimed ε is what the library's accountant says for the noise multiplier you asked
for. An honest mechanism's lower bound must sit below it. ``--broken`` trains with the
noise multiplier silently divided by 10 while still claiming the original ε (the kind of
bug an audit exists to catch): the lower bound then lands above the claim.

Examples:
  python examples/audit.py                # honest: lower bound < claimed ε
  python examples/audit.py --broken       # noise / 10: lower bound > claimed ε
  python examples/audit.py --steps=4 --noise_multiplier=3
"""

from __future__ import annotations

import time

from absl import app, flags

import tf_autoclip as ac
from tf_autoclip import audit

flags.DEFINE_float("noise_multiplier", 1.5, "σ: the claimed noise std / sensitivity.")
flags.DEFINE_enum("clipping", "auto-s", ["auto-s", "auto-v", "abadi"], "Per-example clipping.")
flags.DEFINE_float("l2_norm_clip", 0.5, "Clipping threshold R for --clipping=abadi.")
flags.DEFINE_integer("num_canaries", 10_000, "Gradient canaries (each inserted w.p. 1/2).")
flags.DEFINE_integer("steps", 1, "Full-batch DP-SGD steps (the releases audited).")
flags.DEFINE_float("delta", 1e-5, "δ of the claim.")
flags.DEFINE_float("confidence", 0.95, "Confidence of the lower bound.")
flags.DEFINE_bool("broken", False, "Train with σ / 10 but claim the ε of σ.")
flags.DEFINE_integer("seed", 0, "Seed of the canaries' membership and of the noise (tests).")
FLAGS = flags.FLAGS


def run_audit(
    noise_multiplier: float, clipping: str, l2_norm_clip: float, num_canaries: int,
    steps: int, delta: float, confidence: float, broken: bool, seed: int,
) -> dict:  # fmt: skip
    """Audits ``steps`` DP-SGD steps; returns the claimed ε and the audit's bounds."""
    # What is claimed: the accountant's ε for sigma, q = 1 (full batches), `steps` releases.
    claimed = min(
        ac.compute_epsilon(noise_multiplier, 1.0, steps, delta, accountant="rdp"),
        ac.compute_epsilon(noise_multiplier, 1.0, steps, delta, accountant="pld"),
    )
    # What runs: the DP optimizer, with the bug under --broken.
    trained_sigma = noise_multiplier / 10 if broken else noise_multiplier

    def optimizer_fn(expected_batch_size: int):
        return ac.DPAutoSGD(
            learning_rate=1.0,
            noise_multiplier=trained_sigma,
            clipping=clipping,
            l2_norm_clip=l2_norm_clip if clipping == "abadi" else None,
            expected_batch_size=expected_batch_size,
            seed=seed,
        )

    result = audit.gradient_canary_audit(
        optimizer_fn, num_canaries, delta, confidence=confidence, seed=seed, steps=steps
    )
    return {"claimed_epsilon": claimed, "result": result}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    start = time.time()
    record = run_audit(
        FLAGS.noise_multiplier, FLAGS.clipping, FLAGS.l2_norm_clip, FLAGS.num_canaries,
        FLAGS.steps, FLAGS.delta, FLAGS.confidence, FLAGS.broken, FLAGS.seed,
    )  # fmt: skip
    claimed, result = record["claimed_epsilon"], record["result"]
    mechanism = "BROKEN (σ / 10)" if FLAGS.broken else "honest"
    print(f"\nMechanism: {mechanism} DP-SGD, {FLAGS.clipping}, σ = {FLAGS.noise_multiplier:g} "
          f"claimed, {FLAGS.steps} full-batch step(s)")  # fmt: skip
    print(f"Claimed ε = {claimed:.3f} at δ = {FLAGS.delta:g} (accountant)")
    print(f"Audit: {result}")
    caught = result.one_run_epsilon > claimed
    verdict = "ABOVE the claim: the mechanism is not (ε, δ)-DP as claimed" if caught else (
        "below the claim: consistent with it (an audit never proves a claim)")  # fmt: skip
    print(f"Empirical lower bound ε ≥ {result.one_run_epsilon:.3f} is {verdict}.")
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    app.run(main)
