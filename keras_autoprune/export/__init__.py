"""Verified export of Keras models: TFLite (LiteRT), SavedModel, latency.

See docs/export.md.
"""

from keras_autoprune.export.latency import LatencyResult, measure_latencies, measure_latency
from keras_autoprune.export.result import ExportResult
from keras_autoprune.export.saved_model import export_saved_model
from keras_autoprune.export.tflite import QUANTIZE_MODES, export_tflite
from keras_autoprune.export.verify import Figures, verify_tflite

__all__ = [
    "ExportResult",
    "Figures",
    "LatencyResult",
    "QUANTIZE_MODES",
    "export_saved_model",
    "export_tflite",
    "measure_latencies",
    "measure_latency",
    "verify_tflite",
]
