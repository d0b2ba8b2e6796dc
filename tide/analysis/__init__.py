"""Analysis of trained SAEs over captured activations: per-feature statistics (frequency, timestep
profile, top-k occurrences, class AUROC, spatial maps) from one streaming pass."""

from tide.analysis.feature_stats import FeatureStats, compute_feature_stats, load_feature_stats, save_feature_stats

__all__ = ["FeatureStats", "compute_feature_stats", "load_feature_stats", "save_feature_stats"]
