"""Analysis of trained SAEs over captured activations: per-feature statistics (frequency, timestep
profile, top-k occurrences, class AUROC, spatial maps, activation histograms) from one streaming pass,
automatic and user labels, and the feature atlas (a static site with a page per firing feature).

The atlas is imported here directly; the models it regenerates images with load only when
:func:`export_dashboard` runs. Steering (:mod:`tide.analysis.steering`) loads the hooks and the
sampler, so it is imported from its module.
"""

from tide.analysis.dashboard import DashboardConfig, DashboardResult, export_dashboard
from tide.analysis.feature_stats import (FeatureStats, FeatureStatsConfig, FeatureStatsResult, compute_feature_stats,
                                         load_feature_stats, save_feature_stats)
from tide.analysis.labels import auto_label, load_labels

__all__ = ["FeatureStats", "FeatureStatsConfig", "FeatureStatsResult", "compute_feature_stats", "load_feature_stats",
           "save_feature_stats", "auto_label", "load_labels", "DashboardConfig", "DashboardResult", "export_dashboard"]
