"""Evaluation: metrics, confusion-matrix plots, the HTML report, Grad-CAM explanations, and ``evaluate`` which
writes them all."""
from finetune.evaluation.evaluator import align_classes, evaluate
from finetune.evaluation.explain import explain_images, grad_cam, write_explanations
from finetune.evaluation.metrics import (
    classification_metrics,
    expected_calibration_error,
    most_confused_pairs,
    negative_log_likelihood,
    per_class_rows,
    topk_accuracy,
)
from finetune.evaluation.plots import cluster_order, confusion_matrix_png, most_confused_classes, row_normalize
from finetune.evaluation.report import render_report

__all__ = [
    "align_classes", "evaluate",
    "explain_images", "grad_cam", "write_explanations",
    "classification_metrics", "expected_calibration_error", "most_confused_pairs", "negative_log_likelihood",
    "per_class_rows", "topk_accuracy",
    "cluster_order", "confusion_matrix_png", "most_confused_classes", "row_normalize",
    "render_report",
]
