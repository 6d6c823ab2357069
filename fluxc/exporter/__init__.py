"""Export: `fluxc.export` (torch.export programs of the rewritten graph), `export_onnx` (`onnx`: fluxc's ops
as ONNX), `export_aoti` (AOTInductor packages).

Importing the package imports nothing; `program` needs transformers, `onnx` needs onnx and onnxscript.
"""
