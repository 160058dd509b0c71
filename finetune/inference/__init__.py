"""Inference: a checkpoint's predictor (``load``), its preprocessing, the calibration temperature that divides
its logits, and test-time augmentation."""
from finetune.inference.predictor import Prediction, Predictor, eval_transform, load, predict_probabilities, topk_indices
from finetune.inference.temperature import TemperatureScaled, fit_temperature, meta_temperature, scaled, softmax
from finetune.inference.tta import TTA_MODES, VIEWS, TtaModel, TtaTransform, check_mode, views

__all__ = [
    "Prediction", "Predictor", "eval_transform", "load", "predict_probabilities", "topk_indices",
    "TemperatureScaled", "fit_temperature", "meta_temperature", "scaled", "softmax",
    "TTA_MODES", "VIEWS", "TtaModel", "TtaTransform", "check_mode", "views",
]
