"""keras-hub backbones built from small explicit arguments (random weights, no presets, no network).

Used by tests/test_keras_hub.py and `python -m benchmarks.keras_hub_report`.
The arguments follow keras-hub's own backbone tests, shrunk further.
"""

from __future__ import annotations

import keras
import numpy as np


def _resnet(version: int):
    from keras_hub.models import ResNetBackbone

    return ResNetBackbone(
        input_conv_filters=[16], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 16, 32],
        stackwise_num_blocks=[1, 1, 2], stackwise_num_strides=[1, 2, 2], block_type="bottleneck_block",
        use_pre_activation=version == 2, image_shape=(32, 32, 3))


def _mobilenet_v3():
    from keras_hub.models import MobileNetBackbone

    return MobileNetBackbone(
        stackwise_expansion=[[16, 24], [32, 48]], stackwise_num_blocks=[2, 2],
        stackwise_num_filters=[[8, 8], [16, 16]], stackwise_kernel_size=[[3, 3], [5, 5]],
        stackwise_num_strides=[[2, 1], [2, 1]], stackwise_se_ratio=[[None, None], [0.25, 0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish", "hard_swish"]],
        stackwise_padding=[[1, 1], [2, 2]], output_num_filters=32, depthwise_filters=8, depthwise_stride=2,
        depthwise_residual=False, squeeze_and_excite=0.5, last_layer_filter=48, image_shape=(32, 32, 3))


def _efficientnet(version: int):
    from keras_hub.models import EfficientNetBackbone

    common = dict(stackwise_kernel_sizes=[3, 3, 3], stackwise_num_repeats=[1, 2, 2], stackwise_strides=[1, 2, 2],
                  stackwise_force_input_filters=[0] * 3, stackwise_nores_option=[False] * 3, width_coefficient=0.25,
                  depth_coefficient=1.0, input_shape=(32, 32, 3))
    if version == 1:
        return EfficientNetBackbone(
            stackwise_input_filters=[32, 16, 24], stackwise_output_filters=[16, 24, 40],
            stackwise_expansion_ratios=[1, 6, 6], stackwise_squeeze_and_excite_ratios=[0.25] * 3,
            stackwise_block_types=["v1"] * 3, **common)
    return EfficientNetBackbone(
        stackwise_input_filters=[24, 24, 48], stackwise_output_filters=[24, 48, 64],
        stackwise_expansion_ratios=[1, 4, 4], stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.25],
        stackwise_block_types=["fused", "fused", "unfused"], **common)


def _cspnet():
    from keras_hub.models import CSPNetBackbone

    return CSPNetBackbone(
        stem_filters=16, stem_kernel_size=3, stem_strides=1, stackwise_strides=2, stackwise_depth=[1, 2],
        stackwise_num_filters=[16, 24], block_type="dark_block", stage_type="csp", down_growth=True,
        bottle_ratio=(0.5, 1.0), block_ratio=(1.0, 0.5), expand_ratio=(2.0, 1.0), stem_padding="same",
        image_shape=(32, 32, 3))


def _densenet():
    from keras_hub.models import DenseNetBackbone

    return DenseNetBackbone(stackwise_num_repeats=[2, 2], growth_rate=8, image_shape=(32, 32, 3))


def _vgg():
    from keras_hub.models import VGGBackbone

    return VGGBackbone(stackwise_num_repeats=[1, 2], stackwise_num_filters=[8, 16], image_shape=(32, 32, 3))


def _xception():
    from keras_hub.models import XceptionBackbone

    return XceptionBackbone(stackwise_conv_filters=[[8, 16], [16, 32], [32, 32]],
                            stackwise_pooling=[True, True, False], image_shape=(32, 32, 3))


def _hgnetv2():
    from keras_hub.models import HGNetV2Backbone

    stages = [[16, 8, 32, 1, 1, 3], [32, 16, 48, 1, 1, 3]]
    return HGNetV2Backbone(
        depths=[1, 1], embedding_size=16, hidden_sizes=[s[2] for s in stages], stem_channels=[3, 8, 16],
        hidden_act="relu", use_learnable_affine_block=False, stackwise_stage_filters=stages,
        apply_downsample=[False, True], use_lightweight_conv_block=[False, True], image_shape=(32, 32, 3))


def _deeplab_v3():
    from keras_hub.models import DeepLabV3Backbone

    return DeepLabV3Backbone(
        image_encoder=_resnet(1), low_level_feature_key="P2", spatial_pyramid_pooling_key="P4",
        upsampling_size=4, dilation_rates=[2, 4], projection_filters=8, image_shape=(32, 32, 3))


def _vit():
    from keras_hub.models import ViTBackbone

    return ViTBackbone(image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)


def _deit():
    from keras_hub.models import DeiTBackbone

    return DeiTBackbone(image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                        intermediate_dim=32)


def _mit():
    from keras_hub.models import MiTBackbone

    return MiTBackbone(layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2], layerwise_sr_ratios=[4, 2],
                       max_drop_path_rate=0.0, layerwise_patch_sizes=[7, 3], layerwise_strides=[4, 2],
                       hidden_dims=[8, 16], image_shape=(32, 32, 3))


def _bert():
    from keras_hub.models import BertBackbone

    return BertBackbone(vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
                        max_sequence_length=8)


#: name -> builder; SLOW ones are marked slow in the tests.
BACKBONES = {
    "ResNetV1": lambda: _resnet(1), "ResNetV2": lambda: _resnet(2), "MobileNetV3": _mobilenet_v3,
    "EfficientNetV1": lambda: _efficientnet(1), "EfficientNetV2": lambda: _efficientnet(2), "CSPNet": _cspnet,
    "DenseNet": _densenet, "VGG": _vgg, "Xception": _xception, "HGNetV2": _hgnetv2, "DeepLabV3": _deeplab_v3,
    "ViT": _vit, "DeiT": _deit, "MiT": _mit, "BERT": _bert,
}
SLOW = {"DeepLabV3", "HGNetV2", "EfficientNetV1", "EfficientNetV2", "MiT", "BERT", "Xception"}


def sample_inputs(model: keras.Model, batch: int = 2, seed: int = 0):
    """Random inputs for every model input (token ids in [0, 10), segment ids in [0, 2), masks of ones)."""
    rng = np.random.default_rng(seed)
    values = []
    for tensor in model.inputs:
        shape = (batch,) + tuple(SEQUENCE_LENGTH if d is None else d for d in tensor.shape[1:])
        if "int" in str(tensor.dtype):
            high = 1 if "mask" in tensor.name else 2 if "segment" in tensor.name else 10
            value = np.ones(shape, "int32") if high == 1 else rng.integers(0, high, shape).astype("int32")
        else:
            value = rng.normal(0, 1, shape).astype("float32")
        values.append(value)
    if isinstance(model.input, dict):
        return {name: v for name, v in zip(model.input, values)}
    return values[0] if len(values) == 1 else values


SEQUENCE_LENGTH = 8
"""The length given to input dimensions of unknown size (token sequences): samples, FLOPs."""


def flops_input_shape(model: keras.Model):
    """``input_shape`` for `kap.count_flops` when an input has a dimension of unknown size (else None)."""
    shapes = [tuple(SEQUENCE_LENGTH if d is None else d for d in t.shape[1:]) for t in model.inputs]
    unknown = any(d is None for t in model.inputs for d in t.shape[1:])
    return (shapes[0] if len(shapes) == 1 else shapes) if unknown else None


def export_data(result: dict):
    """Representative data for `kap.export_tflite` of a swept model: its sample inputs when an input
    has a dimension of unknown size (BERT's token sequences), else None (random inputs)."""
    unknown = any(d is None for tensor in result["slim"].inputs for d in tensor.shape[1:])
    return result["inputs"] if unknown else None


def sweep_one(name: str, ratio: float = 0.3) -> dict:
    """Graph, uniform plan, apply and mask; figures for the test and the docs."""
    from tests.helpers import randomize, relative_error
    from tests.zoo import timed_surgery

    model = BACKBONES[name]()
    randomize(model, scale=0.05)
    x = sample_inputs(model)
    outputs = [np.asarray(v) for v in keras.tree.flatten(model(x))]
    graph, slim, masked, graph_s, apply_s = timed_surgery(model, ratio)
    expected = [np.asarray(v) for v in keras.tree.flatten(masked(x))]
    received = [np.asarray(v) for v in keras.tree.flatten(slim(x))]
    channels = sum(g.size for g in graph.groups)
    prunable = sum(g.size for g in graph.prunable_groups)
    return dict(
        name=name, model=model, slim=slim, graph=graph, inputs=x, outputs=outputs,
        groups=len(graph.groups), prunable_groups=len(graph.prunable_groups),
        prunable_share=prunable / channels if channels else 0.0,
        error=max(relative_error(r, e) for r, e in zip(received, expected)),
        output_scale=max(float(np.max(np.abs(e))) for e in expected),
        shapes=[e.shape for e in expected] == [r.shape for r in received],
        graph_s=graph_s, apply_s=apply_s,
    )
