"""Analysis of trained SAEs over captured activations: per-feature statistics (frequency, timestep
profile, top-k occurrences, class AUROC, spatial maps) from one streaming pass, automatic and
user labels, and a static dashboard export.

The dashboard (which regenerates images, so it loads models) is imported on first use.
"""

from tide.analysis.feature_stats import (FeatureStats, FeatureStatsConfig, compute_feature_stats, load_feature_stats,
                                         save_feature_stats)
from tide.analysis.labels import auto_label, load_labels

__all__ = ["FeatureStats", "FeatureStatsConfig", "compute_feature_stats", "load_feature_stats", "save_feature_stats",
           "auto_label", "load_labels", "DashboardConfig", "export_dashboard"]


def __getattr__(name):
    if name in ("DashboardConfig", "export_dashboard"):
        from tide.analysis import dashboard

        return getattr(dashboard, name)
    raise AttributeError(f"module 'tide.analysis' has no attribute {name!r}")
