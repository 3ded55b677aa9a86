import numpy as np

from protos.seqserve.v1 import inference_pb2 as pb


def test_step_matches_ort(server, model_repo, kit):
    array, step_request, ort_reference = kit.array, kit.step_request, kit.ort_reference
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    ys = []
    for t in range(10):
        r = server.stub.Step(step_request("lstm", 7, x[t], start=(t == 0)))
        ys.append(array(r.y)[0])
        assert r.position == t + 1
    want = ort_reference(model_repo / "lstm/1/model.onnx", x[None])["y"][0]
    assert np.abs(np.array(ys) - want).max() < 1e-4
