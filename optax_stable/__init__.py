"""optax_stable: composable Optax transforms that keep training stable."""

from optax_stable import policies
from optax_stable.accumulation import AccumulateState
from optax_stable.accumulation import AccumulateTransformation
from optax_stable.accumulation import accumulate
from optax_stable.accumulation import microbatch
from optax_stable import recipes
from optax_stable import scopes
from optax_stable.clipping import AdaGCClipState
from optax_stable.clipping import AdaptiveGradClipState
from optax_stable.clipping import AutoClipState
from optax_stable.clipping import ClipByGlobalNormState
from optax_stable.clipping import ClipByNormState
from optax_stable.clipping import ClipState
from optax_stable.clipping import ZClipState
from optax_stable.clipping import adagc
from optax_stable.clipping import adaptive_grad_clip
from optax_stable.clipping import autoclip
from optax_stable.clipping import clip
from optax_stable.clipping import clip_by_global_norm
from optax_stable.clipping import clip_by_norm
from optax_stable.clipping import zclip
from optax_stable.guards import SkipNonfiniteState
from optax_stable.guards import SkipSpikesState
from optax_stable.guards import skip_nonfinite
from optax_stable.guards import skip_spikes
from optax_stable.integration import apply_gradients
from optax_stable.low_precision import DynamicLossScaleState
from optax_stable.low_precision import current_loss_scale
from optax_stable.low_precision import dynamic_loss_scale
from optax_stable.low_precision import with_float32_state
from optax_stable.monitoring import MonitorState
from optax_stable.monitoring import monitor
from optax_stable.paths import path_mask
from optax_stable.paths import path_str
from optax_stable.policies import ThresholdPolicy
from optax_stable.reports import flight_report
from optax_stable.scopes import GroupInfo
from optax_stable.scopes import GroupLayout
from optax_stable.scopes import describe_groups
from optax_stable.spam import PeriodicResetState
from optax_stable.spam import ScaleByAdamMomentsState
from optax_stable.spam import ScaleBySpamState
from optax_stable.spam import SpikeClipState
from optax_stable.spam import periodic_reset
from optax_stable.spam import scale_by_adam_moments
from optax_stable.spam import scale_by_spam
from optax_stable.spam import spike_clip
from optax_stable.stable_adam import ScaleByStableAdamState
from optax_stable.stable_adam import scale_by_stable_adam
from optax_stable.telemetry import stats
from optax_stable.weight_decay import DecoupledWeightDecayState
from optax_stable.weight_decay import add_l1_penalty
from optax_stable.weight_decay import add_l2_penalty
from optax_stable.weight_decay import decoupled_weight_decay
from optax_stable.weight_decay import default_decay_mask

__version__ = "0.2.0"

__all__ = [
    "AccumulateState",
    "AccumulateTransformation",
    "AdaGCClipState",
    "AdaptiveGradClipState",
    "AutoClipState",
    "ClipByGlobalNormState",
    "ClipByNormState",
    "ClipState",
    "DecoupledWeightDecayState",
    "DynamicLossScaleState",
    "GroupInfo",
    "GroupLayout",
    "MonitorState",
    "PeriodicResetState",
    "ScaleByAdamMomentsState",
    "ScaleBySpamState",
    "ScaleByStableAdamState",
    "SkipNonfiniteState",
    "SkipSpikesState",
    "SpikeClipState",
    "ThresholdPolicy",
    "ZClipState",
    "accumulate",
    "add_l1_penalty",
    "add_l2_penalty",
    "adagc",
    "adaptive_grad_clip",
    "apply_gradients",
    "autoclip",
    "clip",
    "clip_by_global_norm",
    "clip_by_norm",
    "current_loss_scale",
    "decoupled_weight_decay",
    "default_decay_mask",
    "describe_groups",
    "dynamic_loss_scale",
    "flight_report",
    "microbatch",
    "monitor",
    "path_mask",
    "path_str",
    "periodic_reset",
    "policies",
    "recipes",
    "scale_by_adam_moments",
    "scale_by_spam",
    "scale_by_stable_adam",
    "scopes",
    "skip_nonfinite",
    "skip_spikes",
    "spike_clip",
    "stats",
    "with_float32_state",
    "zclip",
]
