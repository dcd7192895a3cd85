"""miss_compile.export: merged and unmerged ONNX of MiSS models, run on onnxruntime."""

from .adapters import write_onnx_adapter, write_onnx_stack
from .genai import GenaiFolder, export_genai_folder
from .onnx import ExportResult, export_causal_lm, export_onnx
from .runtime import MissSession, load_session

__all__ = ["export_onnx", "export_causal_lm", "export_genai_folder", "GenaiFolder", "ExportResult", "write_onnx_adapter", "write_onnx_stack", "load_session", "MissSession"]
