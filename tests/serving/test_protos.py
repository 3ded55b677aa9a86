"""The committed generated code is what grpc_tools.protoc makes of the .proto."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "protos/seqserve/v1/inference.proto"
GENERATED = ["inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py"]


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", PROTO],
                   cwd=ROOT, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "protos/seqserve/v1" / name).read_text()
        committed = (ROOT / "protos/seqserve/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: regenerate (see protos/__init__.py)"


def test_import_path_matches_proto_path():
    from protos.seqserve.v1 import inference_pb2

    assert inference_pb2.DESCRIPTOR.name == PROTO
    assert inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name == "seqserve.v1.Inference"
