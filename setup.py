"""Packaging for keras-autoprune."""

from setuptools import find_packages, setup

# keras-hub: the backbone sweep (tests/test_keras_hub.py). It pulls tensorflow-text, which requires
# the full `tensorflow` wheel of the same minor version: in a test environment it sits next to
# tensorflow-cpu (same version, same files). The sweep is skipped where keras-hub is absent.
_TEST = [
    "pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "scikit-learn>=1.2", "matplotlib>=3.6",
    'keras-hub==0.32.*; python_version >= "3.11"',
]
_DEMO = ["ai-edge-litert>=1.2", "matplotlib>=3.6", "scikit-learn>=1.2"]
_BENCH = ["ai-edge-litert>=1.2", "matplotlib>=3.6", "tensorflow-datasets>=4.9", "tf_keras>=2.16", "tensorflow-model-optimization>=0.8"]
# The Torch-Pruning peer of benchmark v2 (benchmarks/torch_peer.py); not in "all": torch is large.
_TORCH = ["torch", "torch-pruning==1.6.*"]

setup(
    name="keras-autoprune",
    version="0.1.0.dev0",
    description=(
        "Automatic, curvature-aware structured pruning for Keras 3 with real "
        "layer surgery and verified TFLite / SavedModel export."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_autoprune", "keras_autoprune.*"]),
    py_modules=["keras_autoprune_cli"],  # the command's entry point: quiets TensorFlow before it loads
    python_requires=">=3.10",
    # TensorFlow comes from an extra so that CPU-only machines can use the
    # small `tensorflow-cpu` wheel and GPU machines the full one: both provide
    # the `tensorflow` module, and pip cannot pick between them by itself.
    # `import keras_autoprune` checks that one of them (>= 2.16) is present.
    # LiteRT runs the exported .tflite files for verification and latency.
    install_requires=["keras>=3", "numpy>=1.23", "ai-edge-litert>=1.2"],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.16"],
        "gpu": ["tensorflow>=2.16"],
        "test": _TEST,
        "demo": _DEMO,
        "bench": _BENCH,
        "torch": _TORCH,
        "all": sorted(set(_TEST + _DEMO + _BENCH)),
    },
    entry_points={"console_scripts": ["keras-autoprune=keras_autoprune_cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: Keras",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
