"""The keras-hub backbone sweep: small explicit arguments, random weights, uniform 30% plan.

For each backbone: the groups found and how many are prunable (exact, for
keras-hub 0.32), ``apply_plan == mask_plan`` to 1e-5, the input model
untouched, fewer FLOPs, and a verified TFLite export of the pruned model.
Transformers: the heads of `keras.layers.MultiHeadAttention` and the MLP
hidden units are prunable (ViT, BERT, DeiT, whose encoder blocks return
``(x, None)``); MiT's MixFFN hidden units are prunable, and so are the
per-head dimensions of its traced attention (query/key and value/output
projections, through ``ops.transpose`` and ``ops.matmul``). The figures are published in
docs/architectures.md (`python -m benchmarks.keras_hub_report`).
"""

import keras
import numpy as np
import pytest

import keras_autoprune as kap

pytest.importorskip("keras_hub", reason="keras-hub is not installed (the test extra installs it on Python >= 3.11)")

from tests.keras_hub_zoo import BACKBONES, SLOW, export_data, flops_input_shape, sweep_one  # noqa: E402

#: name -> (groups, prunable groups, whether the pruned model exports to a verified TFLite file).
EXPECTED = {
    "ResNetV1": (13, 11, True),
    "ResNetV2": (13, 11, True),  # its Pad op is seen through (op handlers)
    "MobileNetV3": (13, 11, True),
    "EfficientNetV1": (14, 12, True),
    "EfficientNetV2": (12, 10, True),
    "CSPNet": (13, 11, True),  # its Split op is seen through (op handlers)
    "DenseNet": (11, 7, True),
    "VGG": (4, 2, True),
    "Xception": (7, 5, True),
    "HGNetV2": (12, 8, True),
    "DeepLabV3": (20, 18, True),  # its pyramid pooling: ops.cast and Resizing pass channels
    "ViT": (6, 4, True),  # 2 blocks: heads + MLP hidden units each
    "DeiT": (6, 4, True),  # 2 blocks: heads + MLP hidden units each (blocks returning (x, None) are traced)
    "MiT": (19, 6, True),  # MixFFN hidden units; per-head dimensions of q/k and of v/proj (traced matmuls)
    "BERT": (6, 4, True),  # heads + MLP hidden units; exported with its sample token ids (sequence length unknown)
}

CASES = [pytest.param(name, id=name, marks=pytest.mark.slow if name in SLOW else ()) for name in BACKBONES]


@pytest.mark.parametrize("name", CASES)
def test_uniform_plan_on_keras_hub_backbone(name, tmp_path):
    groups, prunable, exports = EXPECTED[name]
    result = sweep_one(name, ratio=0.3)
    model, slim = result["model"], result["slim"]
    assert (result["groups"], result["prunable_groups"]) == (groups, prunable)
    assert result["shapes"] and result["output_scale"] > 0
    assert result["error"] <= 1e-5, result["error"]
    # The input model is untouched: it still computes what it computed before pruning.
    before = [np.asarray(v) for v in keras.tree.flatten(model(result["inputs"]))]
    assert all(np.array_equal(a, b) for a, b in zip(before, result["outputs"]))
    if prunable:
        assert slim.count_params() < model.count_params()
        shape = flops_input_shape(model)  # BERT: token sequences of unknown length, counted at 8
        assert kap.count_flops(slim, shape) < kap.count_flops(model, shape)
    if exports:
        assert kap.export_tflite(slim, str(tmp_path / "slim.tflite"), representative_data=export_data(result), num_samples=4).verified
