"""Whether the CPU cell may use BLAS sgemm for big batches, with BLAS pinned to one thread.

Numba's `np.dot` on 2-D float32 arrays calls sgemm through SciPy's
`scipy.linalg.cython_blas`, so the GEMM path needs SciPy. SciPy's OpenBLAS
starts one thread per core; on this project's shared 2-core machine two
threads made a (1024, 256) x (256, 512) sgemm 2.6x SLOWER than one (8.0 vs
3.1 ms; one thread ran at 86 GFLOP/s). The cell is single-threaded by design
(the server shares the cores), so we pin SciPy's BLAS to
SEQSERVE_CELL_BLAS_THREADS threads (default 1) with threadpoolctl. Only the
BLAS libraries SciPy ships are touched (NumPy's own copy is left alone). If
SciPy or threadpoolctl is missing, or SciPy's BLAS cannot be found to pin,
the GEMM path stays off and every batch uses the tile kernels.
"""
from __future__ import annotations

import os

_READY: bool | None = None


def _pin_scipy_blas(threads: int) -> bool:
    """Limit the BLAS libraries inside SciPy's install to `threads`; False if none found.

    Selected by file path, not by threadpoolctl's prefix: SciPy's and NumPy's
    OpenBLAS wheels share the prefix `libscipy_openblas`, and NumPy's is not ours."""
    import scipy
    from threadpoolctl import ThreadpoolController

    root = os.path.dirname(os.path.realpath(scipy.__file__))
    roots = (root + os.sep, root + ".libs" + os.sep)  # wheels vendor the library in scipy.libs/
    controller = ThreadpoolController()
    paths = [lib["filepath"] for lib in controller.info()
             if lib.get("user_api") == "blas"
             and os.path.realpath(lib.get("filepath", "")).startswith(roots)]
    if paths:
        # not used as a context manager: the limit stays for the process
        controller.select(filepath=paths).limit(limits=threads)
    return bool(paths)


def gemm_ready() -> bool:
    """True once SciPy's BLAS is importable and pinned (done once per process)."""
    global _READY
    if _READY is None:
        try:
            import scipy.linalg.cython_blas  # noqa: F401  (loads the library threadpoolctl finds)

            threads = max(1, int(os.environ.get("SEQSERVE_CELL_BLAS_THREADS", "1")))
            _READY = _pin_scipy_blas(threads)
        except ImportError:
            _READY = False
    return _READY
