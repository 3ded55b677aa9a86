"""Service definitions and their generated Python code.

Each `.proto` sits at the path matching its Python package, so generated
imports are absolute (`from protos.seqserve.v1 import inference_pb2`) and
need no patching. Regenerate from the repository root with

    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
        --grpc_python_out=. protos/seqserve/v1/inference.proto

tests/serving/test_protos.py regenerates into a temp dir and fails when the
committed code is stale.
"""
