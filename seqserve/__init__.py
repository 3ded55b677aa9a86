"""seqserve: the front door (CLI) and the artifact contract shared by every layer.

The working layers are the top-level packages: training -> (ONNX artifact,
seqserve.artifact) -> numba_cells / ONNX Runtime -> serving -> protos.
"""
__version__ = "0.1.0"
