"""Deployment: exported models (ONNX, int8 ONNX, TorchScript, safetensors) and the inference benchmark."""
from finetune.deploy.benchmark import BACKENDS, benchmark, format_table
from finetune.deploy.export import FORMATS, export_model
from finetune.deploy.onnx import OnnxModel, metadata_path, read_onnx_info

__all__ = ["BACKENDS", "benchmark", "format_table", "FORMATS", "OnnxModel", "export_model", "metadata_path",
           "read_onnx_info"]
