"""export: merged and unmerged ONNX for onnxruntime.

Not built yet: `export_onnx` and `load_session` land with the export issue (see DESIGN.md).
"""

__all__: list[str] = []
