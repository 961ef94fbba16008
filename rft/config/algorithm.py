"""The algorithm section: advantages, the clipped objective and its variants, KL, rollout correction.

A preset (`PRESETS`) fills every field the recipe leaves unset with a paper's values.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rft.config.sections import Section

Preset = Literal["grpo", "dapo", "gspo", "dr_grpo"]

# The papers' settings. A preset fills every field the recipe leaves unset; explicit fields win.
PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeekMath GRPO (Shao et al. 2024): group-normalised advantages, per-sequence token mean, k3 KL.
    "grpo": {
        "advantage": "grpo", "scale": "group", "eps_low": 0.2, "eps_high": 0.2,
        "loss_agg": "seq-mean-token-mean", "beta": 0.04, "kl_estimator": "k3",
        "importance_sampling_level": "token",
    },
    # DAPO (Yu et al. 2025): clip-higher, dynamic sampling, token-level loss, soft overlong punishment, no KL.
    "dapo": {
        "advantage": "grpo", "scale": "group", "eps_low": 0.2, "eps_high": 0.28,
        "loss_agg": "token-mean", "beta": 0.0, "dynamic_sampling": True, "soft_overlong": True,
        "importance_sampling_level": "token",
    },
    # GSPO (Zheng et al. 2025): sequence-level ratio with its own, much smaller clip range.
    "gspo": {
        "advantage": "grpo", "scale": "group", "eps_low": 3e-4, "eps_high": 4e-4,
        "loss_agg": "seq-mean-token-mean", "beta": 0.0, "importance_sampling_level": "sequence",
    },
    # Dr. GRPO (Liu et al. 2025): no std division, token sums normalised by a constant.
    "dr_grpo": {
        "advantage": "dr_grpo", "scale": "none", "eps_low": 0.2, "eps_high": 0.2,
        "loss_agg": "seq-mean-token-sum-norm", "beta": 0.0, "importance_sampling_level": "token",
    },
}


class AlgorithmConfig(Section):
    """The objective: advantages, clipping, importance sampling, KL, losses and their papers."""

    preset: Preset | None = Field(
        None, description="Fill unset fields with a paper's values: grpo, dapo, gspo, dr_grpo.",
    )
    advantage: Literal["grpo", "dr_grpo", "rloo"] = Field(
        "grpo", description="grpo: (R - group mean) / std; dr_grpo: R - group mean; rloo: R - mean of the "
        "others.",
    )
    scale: Literal["group", "batch", "none"] = Field(
        "group", description="Std used to divide advantages (Bessel-corrected): per group, whole batch, or "
        "none.",
    )
    advantage_eps: float = Field(1e-4, gt=0, description="Added to the std before dividing.")
    eps_low: float = Field(0.2, ge=0, description="Lower clip: ratios below 1 - eps_low are clipped.")
    eps_high: float = Field(
        0.2, ge=0, description="Upper clip: ratios above 1 + eps_high are clipped (DAPO: 0.28).",
    )
    delta: float | None = Field(
        None, gt=1, description="Dual clip (INTELLECT-2): cap the ratio at delta first. e.g. 4.",
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="token: GRPO ratio per token; sequence: GSPO (GSPO-token form)."
    )
    loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = Field(
        "seq-mean-token-mean",
        description="GRPO: mean per sequence then over sequences; DAPO: over all tokens of the global batch; "
        "Dr. GRPO: token sums / max completion length, mean over sequences.",
    )
    beta: float = Field(
        0.0, ge=0, description="KL coefficient to the reference policy. 0 loads no reference.",
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3", description="Per-token KL estimator (Schulman's k1/k2/k3).",
    )
    dynamic_sampling: bool = Field(
        False, description="DAPO: drop zero-variance groups and generate more to refill.",
    )
    max_gen_batches: int = Field(
        3, ge=1, description="Cap on generation rounds per step with dynamic sampling.",
    )
    mask_truncated: bool = Field(
        False, description="Overlong filtering: completions cut at max length get mask 0.",
    )
    soft_overlong: bool = Field(False, description="DAPO soft overlong punishment added to the reward.")
    overlong_max_length: int | None = Field(None, ge=1, description="L_max; default rollout.max_new_tokens.")
    overlong_cache_length: int | None = Field(
        None, ge=1, description="L_cache; default a quarter of L_max (the paper: 4096 of 20480)."
    )
    num_iterations: int = Field(
        1, ge=1, description="mu: updates per generated batch; old log-probs computed once.",
    )
    tis_cap: float | None = Field(
        None, gt=0, description="Truncated importance sampling cap C on exp(logp_old - logp_rollout); None: "
        "off. Shorthand for rollout_correction: token_truncate with rollout_ratio_max: C.",
    )
    rollout_correction: Literal[
        "off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "geometric_truncate",
        "geometric_mask", "icepop",
    ] = Field(
        "off", description="Rollout/trainer mismatch correction with rho = pi_trainer / pi_rollout per token "
        "(token_*), its product over the completion (sequence_*, TRL's sequence modes) or its geometric mean"
        " (geometric_*): *_truncate weights by rho clamped to the bounds (TIS), *_mask weights by rho and "
        "drops tokens or whole completions outside the bounds (MIS; dropped ones leave the normaliser too), "
        "icepop is token_mask with the bounds [0.5, 5] unless set. Off by default, unlike TRL "
        "(sequence_mask, max 3, with vLLM): our engines sample from the trainer's own weights, synced every "
        "step, in its dtype (in float32 vLLM matches the trainer within 2e-5 nats a token), so the mismatch "
        "is kernel noise that rollout/kl and rollout/mismatch_abs_mean measure every step; a correction "
        "changes the objective, and a mask on the product of the ratios drops long completions more often "
        "than short ones (its spread grows with the length). Turn one on when those metrics grow (bf16 or "
        "FP8 sampling, MoE routing); TRL's default is sequence_mask with rollout_ratio_max 3.",
    )
    rollout_ratio_min: float | None = Field(
        None, ge=0, description="Lower bound C_min on the rollout ratio for rollout_correction; None: none."
    )
    rollout_ratio_max: float | None = Field(
        None, gt=0, description="Upper bound C_max on the rollout ratio for rollout_correction (TRL: 3); "
        "None: none.",
    )
    loss: Literal["ppo_clip", "cispo", "sapo"] = Field(
        "ppo_clip", description="Policy surrogate. ppo_clip: -min(r A, clip(r) A) (GRPO, DAPO, GSPO); cispo: "
        "-sg[clip(r, 1 - cispo_eps_low, 1 + cispo_eps_high)] A log pi, every token keeps a gradient "
        "(MiniMax-M1); sapo: -A sigmoid(tau (r - 1)) 4 / tau, a soft gate instead of the clip (Qwen SAPO).",
    )
    cispo_eps_low: float | None = Field(
        None, gt=0, description="CISPO: IS weight floor 1 - eps; None: no floor (as MiniMax-M1)."
    )
    cispo_eps_high: float | None = Field(
        4.0, gt=0, description="CISPO: IS weight cap 1 + eps (ScaleRL caps at 5); None: no cap."
    )
    sapo_tau_pos: float = Field(
        1.0, gt=0, description="SAPO gate temperature where A > 0 (paper and TRL: 1.0).",
    )
    sapo_tau_neg: float = Field(
        1.05, gt=0, description="SAPO gate temperature where A <= 0 (paper and TRL: 1.05).",
    )
    top_entropy_quantile: float = Field(
        1.0, ge=0, le=1, description="rho of 'Beyond the 80/20 Rule': only tokens whose entropy (under the "
        "policy that sampled) is at or above the batch's (1 - rho)-quantile count in the loss; paper 0.2; "
        "1.0: all tokens (as TRL).",
    )
    entropy_coef: float = Field(
        0.0, description="Entropy bonus: loss -= coef * token mean of the entropy over the tokens that count "
        "in the loss (after the rollout and top-entropy masks, as TRL), whatever loss_agg; 0: off.",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> AlgorithmConfig:
        if self.advantage == "dr_grpo" and self.scale != "none":
            raise ValueError("advantage dr_grpo divides by no std: set scale: none (or use advantage: grpo)")
        if self.delta is not None and self.loss != "ppo_clip":
            raise ValueError(f"delta is ppo_clip's dual clip: loss {self.loss} has none (unset delta)")
        if self.tis_cap is not None and self.rollout_correction != "off":
            raise ValueError("tis_cap and rollout_correction both set: use rollout_correction with "
                             "rollout_ratio_max")
        correcting = self.rollout_correction not in ("off", "icepop")
        if correcting and self.rollout_ratio_min is None and self.rollout_ratio_max is None:
            raise ValueError(f"rollout_correction {self.rollout_correction} needs rollout_ratio_max and/or "
                             "rollout_ratio_min")
        if self.rollout_correction.startswith("sequence") and self.rollout_ratio_max is None:
            raise ValueError(f"rollout_correction {self.rollout_correction} needs rollout_ratio_max (a "
                             "product of ratios overflows without a ceiling)")
        if (self.rollout_ratio_min is not None and self.rollout_ratio_max is not None
                and self.rollout_ratio_min > self.rollout_ratio_max):
            raise ValueError("rollout_ratio_min is above rollout_ratio_max")
        return self

    @property
    def rollout_settings(self) -> tuple[str, float | None, float | None] | None:
        """(mode, low, high) of the rollout correction (`tis_cap` resolved), or None when off."""
        if self.tis_cap is not None:
            return "token_truncate", None, self.tis_cap
        if self.rollout_correction == "off":
            return None
        return self.rollout_correction, self.rollout_ratio_min, self.rollout_ratio_max


