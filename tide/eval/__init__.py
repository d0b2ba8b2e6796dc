"""Evaluation: the evaluation classifier and the Fashion-MNIST reader it is trained on, the Fréchet
distance, reconstruction metrics per timestep (:mod:`tide.eval.metrics`), spliced fidelity
(:mod:`tide.eval.splice`) and the `tide eval` report (:mod:`tide.eval.report`).

The metrics, splice and report names are imported on first use: the splice loads the backbones and
transformer_lens (about 9 s more on a 2-core CPU), which the classifier and the Fréchet distance do not need.
"""

from tide.eval.classifier import EvalClassifier, load_classifier
from tide.eval.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from tide.eval.frechet import frechet_distance

_LAZY = {
    "reconstruction_metrics": "metrics", "ReconstructionMetrics": "metrics", "BucketMetrics": "metrics",
    "default_buckets": "metrics",
    "denoiser_error": "splice", "spliced_samples": "splice", "splice_intervention": "splice", "splice_interventions": "splice",
    "DenoiserError": "splice", "SplicedSamples": "splice",
    "EvalConfig": "report", "EvalResult": "report", "evaluate": "report",
}

__all__ = ["EvalClassifier", "load_classifier", "CLASS_NAMES", "load_fashion_mnist", "frechet_distance", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"tide.eval.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tide.eval' has no attribute {name!r}")
