"""DynaMoEConfig: the validated knobs of the nested-expert (shell) MoE layer.

Vocabulary used throughout the package:
- *shell*: one of S equal slices of an FFN's importance-ranked hidden neurons; a Megatron MoE
  expert. Logical shell 0 holds the most important neurons.
- *level* e in 1..K: the union of the first `level_shells[e-1]` shells; level K is the whole
  FFN. A token at level e is computed by exactly those shells, each with weight 1.
- *sensitivity* theta in [0, 1]: the run-time compute knob. theta = 1 puts every token at
  level K (the dense model), theta = 0 at level 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Optional, Tuple

SHELL_PLACEMENTS = ("balanced", "contiguous")
IMPORTANCE_METHODS = ("activation", "activation-rms", "output-error", "weight")
LABEL_REFERENCES = ("residual", "ffn")


@dataclass
class DynaMoEConfig:
    """Configuration of DynaMoE layers; validated on construction.

    Attributes:
        num_shells: S, number of equal FFN slices (= Megatron experts per layer).
        level_fractions: fraction of the FFN at each level, strictly increasing, ending at 1.0;
            each fraction x S must be a whole number of shells.
        sensitivity: theta used by the routed forward (set at run time via `set_sensitivity`).
        label_reference: what a level's error ||P_K - P_e|| is relative to. 'residual' (the
            default): the norm of the residual stream the FFN output is added to, so a token
            whose FFN barely moves its hidden state needs few shells; 'ffn': the norm of the
            full FFN output P_K.
        label_tolerance: tau; a token's label is the smallest level whose relative error is
            within tau.
        label_tolerance_max: soft labels: tau drawn uniformly from [label_tolerance,
            label_tolerance_max], so the router learns P(level e suffices) over that range
            and theta sweeps the tolerance (theta = 1 -> label_tolerance, theta = 0 ->
            label_tolerance_max). None (or equal to label_tolerance) gives hard labels.
        label_fraction: fraction of training steps that compute labels (full-FFN pass) and
            train the router; 1.0 = every step, 0.0 = never.
        router_loss_coeff: weight of the router cross-entropy side loss.
        shell_placement: 'balanced' interleaves shells over EP ranks so that expected load is
            even (level-1 shells see every token); 'contiguous' is Megatron's default order.
        moefied_layers: 0-based indices of the decoder layers to MoEfy; None = all layers.
        importance: neuron ranking: 'activation' (calibration mean |activation| x ||w2
            column||), 'activation-rms' (root-mean-square activation x ||w2 column||: the
            neuron's share of the output's energy, large rare activations count more),
            'output-error' (greedy nested order that keeps each prefix's FFN output closest to
            the dense one on calibration tokens, pairwise correlations counted; TP=1) or
            'weight' (data-free weight norms).
    """

    num_shells: int = 4
    level_fractions: Tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    sensitivity: float = 1.0
    # Measured on SmolLM2-135M (README, "Routing labels"): residual-relative soft labels over
    # [0.02, 0.3] spread each mid layer's tokens over all four levels.
    label_reference: str = "residual"
    label_tolerance: float = 0.02
    label_tolerance_max: Optional[float] = 0.3
    label_fraction: float = 1.0
    router_loss_coeff: float = 1.0
    shell_placement: str = "balanced"
    moefied_layers: Optional[Tuple[int, ...]] = None
    importance: str = "activation"
    level_shells: Tuple[int, ...] = field(init=False)

    def __post_init__(self):
        if self.num_shells < 1:
            raise ValueError(f"--dynamoe-num-shells must be >= 1, got {self.num_shells}")
        fractions = tuple(float(f) for f in self.level_fractions)
        if not fractions:
            raise ValueError("--dynamoe-level-fractions is empty: give e.g. 0.25,0.5,0.75,1.0")
        if any(b <= a for a, b in zip(fractions, fractions[1:])) or fractions[0] <= 0:
            raise ValueError(
                f"--dynamoe-level-fractions {fractions} must be positive and strictly "
                f"increasing, e.g. 0.25,0.5,0.75,1.0")
        if abs(fractions[-1] - 1.0) > 1e-9:
            raise ValueError(
                f"--dynamoe-level-fractions {fractions} must end at 1.0 (the last level is "
                f"the whole FFN)")
        shells = []
        for f in fractions:
            count = Fraction(f).limit_denominator(10_000) * self.num_shells
            if count.denominator != 1:
                raise ValueError(
                    f"level fraction {f} x {self.num_shells} shells = {float(count):g} is not a "
                    f"whole number of shells: choose --dynamoe-num-shells as a multiple of "
                    f"{Fraction(f).limit_denominator(10_000).denominator} or change the "
                    f"fractions")
            shells.append(int(count))
        self.level_fractions = fractions
        self.level_shells = tuple(shells)
        check_sensitivity(self.sensitivity)
        if not 0.0 <= self.label_tolerance < 1.0:
            raise ValueError(f"--dynamoe-label-tolerance must be in [0, 1), got "
                             f"{self.label_tolerance}")
        if self.label_tolerance_max is not None and not (
                self.label_tolerance <= self.label_tolerance_max <= 10.0):
            raise ValueError(
                f"--dynamoe-label-tolerance-max {self.label_tolerance_max} must lie in "
                f"[--dynamoe-label-tolerance {self.label_tolerance}, 10] (equal to it for "
                f"hard labels)")
        if self.label_reference not in LABEL_REFERENCES:
            raise ValueError(f"--dynamoe-label-reference {self.label_reference!r}: choose one "
                             f"of {LABEL_REFERENCES}")
        if not 0.0 <= self.label_fraction <= 1.0:
            raise ValueError(f"--dynamoe-label-fraction must be in [0, 1], got "
                             f"{self.label_fraction}")
        if self.router_loss_coeff < 0:
            raise ValueError(f"--dynamoe-router-loss-coeff must be >= 0, got "
                             f"{self.router_loss_coeff}")
        if self.shell_placement not in SHELL_PLACEMENTS:
            raise ValueError(f"--dynamoe-shell-placement {self.shell_placement!r}: choose one "
                             f"of {SHELL_PLACEMENTS}")
        if self.importance not in IMPORTANCE_METHODS:
            raise ValueError(f"--dynamoe-importance {self.importance!r}: choose one of "
                             f"{IMPORTANCE_METHODS}")
        if self.moefied_layers is not None:
            layers = tuple(sorted(set(int(i) for i in self.moefied_layers)))
            if not layers or layers[0] < 0:
                raise ValueError(f"--dynamoe-layers {self.moefied_layers}: give 0-based layer "
                                 f"indices, or omit the flag to MoEfy every layer")
            self.moefied_layers = layers

    @property
    def soft_labels(self) -> bool:
        """Whether labels are distributions over a tolerance range (see label_targets)."""
        return (self.label_tolerance_max is not None
                and self.label_tolerance_max > self.label_tolerance)

    @property
    def num_levels(self) -> int:
        """K, the number of nested levels."""
        return len(self.level_shells)

    def validate_for_model(self, ffn_hidden_size: int, num_layers: int,
                           expert_model_parallel_size: int = 1,
                           expert_tensor_parallel_size: int = 1) -> None:
        """Check that this config fits a model and a parallel layout; raise naming the fix."""
        if ffn_hidden_size % self.num_shells:
            raise ValueError(
                f"FFN hidden size {ffn_hidden_size} is not divisible into "
                f"{self.num_shells} shells: choose --dynamoe-num-shells among the divisors of "
                f"{ffn_hidden_size}")
        shell_size = ffn_hidden_size // self.num_shells
        if shell_size % expert_tensor_parallel_size:
            raise ValueError(
                f"shell size {shell_size} (FFN {ffn_hidden_size} / {self.num_shells} shells) is "
                f"not divisible by the expert tensor-parallel size "
                f"{expert_tensor_parallel_size}: use fewer shells or a smaller TP")
        if self.num_shells % expert_model_parallel_size:
            raise ValueError(
                f"{self.num_shells} shells cannot be split over expert-parallel size "
                f"{expert_model_parallel_size}: --expert-model-parallel-size must divide "
                f"--dynamoe-num-shells")
        if self.moefied_layers is not None and self.moefied_layers[-1] >= num_layers:
            raise ValueError(f"--dynamoe-layers {self.moefied_layers} names a layer >= "
                             f"num_layers={num_layers}")

    def is_moefied(self, layer_index: int) -> bool:
        """Whether decoder layer `layer_index` (0-based) is a DynaMoE layer."""
        return self.moefied_layers is None or layer_index in self.moefied_layers

    def to_dict(self) -> dict:
        """Plain dict (JSON-able) for checkpoint metadata; `from_dict` inverts it."""
        d = asdict(self)
        d.pop("level_shells")
        d["level_fractions"] = list(self.level_fractions)
        if self.moefied_layers is not None:
            d["moefied_layers"] = list(self.moefied_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DynaMoEConfig":
        """Rebuild a config written by `to_dict`."""
        d = dict(d)
        if "label_reference" not in d:
            # Written before soft, residual-relative labels: keep that checkpoint's meaning
            # (hard labels relative to the FFN output).
            d.update(label_reference="ffn", label_tolerance_max=None)
        d["level_fractions"] = tuple(d["level_fractions"])
        if d.get("moefied_layers") is not None:
            d["moefied_layers"] = tuple(d["moefied_layers"])
        return cls(**d)


def check_sensitivity(theta: float) -> float:
    """Return theta as a float, or raise when it is outside [0, 1]."""
    theta = float(theta)
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"sensitivity theta must be in [0, 1] (1 = dense compute, 0 = level 1 "
                         f"only), got {theta}")
    return theta
