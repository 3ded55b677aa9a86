"""Numba streaming cell: advance many live RNN/LSTM/GRU sessions one step at a time.

    from numba_cells import load_cell
    cell = load_cell("model.onnx", device="auto", capacity=1024)

The ONNX file is the only input (onnx + numpy + numba; no torch, no serving).
"""
from numba_cells.cell import Cell, cuda_available, load_cell
from numba_cells.onnx_model import CellError, CellSpec, load_spec, parse_model

__all__ = ["Cell", "CellError", "CellSpec", "cuda_available", "load_cell", "load_spec", "parse_model"]
