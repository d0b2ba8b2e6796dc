"""Evaluation: the evaluation classifier and the Fashion-MNIST reader it is trained on."""

from tide.eval.classifier import EvalClassifier, load_classifier
from tide.eval.fashion_mnist import CLASS_NAMES, load_fashion_mnist

__all__ = ["EvalClassifier", "load_classifier", "CLASS_NAMES", "load_fashion_mnist"]
