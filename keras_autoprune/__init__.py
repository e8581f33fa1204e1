"""keras-autoprune: automatic structured pruning for Keras 3.

The public API (see docs/ and README.md):

>>> import keras_autoprune as kap
>>> graph = kap.DependencyGraph(model)                      # doctest: +SKIP
>>> slim = kap.apply_plan(model, kap.PrunePlan.uniform(graph, 0.3))  # doctest: +SKIP
"""

from keras_autoprune._version_check import check_tensorflow

check_tensorflow()

from keras_autoprune.accounting import LayerCost, count_flops, count_params, flops_table, format_table  # noqa: E402
from keras_autoprune.batchnorm import recalibrate_batchnorm  # noqa: E402
from keras_autoprune.budget import Budget  # noqa: E402
from keras_autoprune.callbacks import (  # noqa: E402
    EigenDamageCallback,
    MagnitudeCallback,
    NAPCallback,
    PruningCallback,
    PSAPCallback,
    RankedPruningCallback,
)
from keras_autoprune.errors import BudgetUnreachableError, ExportError, PlanError, SurgeryError, UnsupportedModelError, VerificationError  # noqa: E402
from keras_autoprune.export import (  # noqa: E402
    ExportResult,
    LatencyResult,
    export_saved_model,
    export_tflite,
    measure_latencies,
    measure_latency,
    verify_tflite,
)
from keras_autoprune.graph import ChannelGroup, ChannelMember, DependencyGraph  # noqa: E402
from keras_autoprune.graph import handlers  # noqa: E402
from keras_autoprune.graph.handlers import register_handler  # noqa: E402
from keras_autoprune.multi_worker import (  # noqa: E402
    disable_multi_worker_fit,
    enable_multi_worker_fit,
    multi_worker_fit_enabled,
)
from keras_autoprune.report import LayerChange, PruningReport  # noqa: E402
from keras_autoprune.surgery import (  # noqa: E402
    FactorizationPlan,
    LayerFactorization,
    LayerReplacement,
    PrunePlan,
    apply_plan,
    mask_plan,
    replace_layers,
)
from keras_autoprune import allocation  # noqa: E402
from keras_autoprune import metapruning  # noqa: E402
from keras_autoprune import red  # noqa: E402

__version__ = "0.1.0.dev0"

__all__ = sorted(
    [
        "Budget",
        "BudgetUnreachableError",
        "recalibrate_batchnorm",
        "ChannelGroup",
        "EigenDamageCallback",
        "MagnitudeCallback",
        "NAPCallback",
        "PSAPCallback",
        "PruningCallback",
        "RankedPruningCallback",
        "LayerChange",
        "LayerCost",
        "count_flops",
        "count_params",
        "flops_table",
        "format_table",
        "ChannelMember",
        "ExportError",
        "ExportResult",
        "LatencyResult",
        "VerificationError",
        "export_saved_model",
        "export_tflite",
        "enable_multi_worker_fit",
        "disable_multi_worker_fit",
        "multi_worker_fit_enabled",
        "measure_latencies",
        "measure_latency",
        "verify_tflite",
        "DependencyGraph",
        "PlanError",
        "PrunePlan",
        "FactorizationPlan",
        "LayerFactorization",
        "LayerReplacement",
        "replace_layers",
        "PruningReport",
        "SurgeryError",
        "UnsupportedModelError",
        "allocation",
        "apply_plan",
        "handlers",
        "mask_plan",
        "metapruning",
        "register_handler",
    ]
)
