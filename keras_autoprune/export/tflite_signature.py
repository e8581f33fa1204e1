"""Reading a ``.tflite`` file's signatures without running it.

A converter can silently drop the signature (TF 2.21's
``from_concrete_functions`` falls back to a signature-less frozen graph when
it cannot save the function, e.g. with the custom gradient of ``swish``),
and LiteRT then fails with ``Invalid signature_key provided``. `convert`
checks every file it produces with `signature_problem`. The flatbuffer is
read with TensorFlow's generated schema, so files holding Flex ops (which
LiteRT's Python interpreter cannot load) are checked too.

Example:

>>> signature_problem(content, ["input_0"], ["output_0"]) is None   # doctest: +SKIP
True
"""

from __future__ import annotations

from collections.abc import Sequence

from keras_autoprune.export.signature import SIGNATURE_KEY


def file_signatures(content: bytes) -> dict[str, tuple[list[str], list[str]]]:
    """``{signature key: (input names, output names)}`` of a ``.tflite`` flatbuffer."""
    try:
        from tensorflow.lite.python import schema_py_generated as schema
    except ImportError:  # pragma: no cover - other TF layouts: ask LiteRT
        from ai_edge_litert.interpreter import Interpreter

        listed = Interpreter(model_content=content).get_signature_list()
        return {key: (list(s["inputs"]), list(s["outputs"])) for key, s in listed.items()}
    model = schema.Model.GetRootAs(content, 0)
    signatures = {}
    for i in range(model.SignatureDefsLength()):
        sig = model.SignatureDefs(i)
        inputs = [sig.Inputs(j).Name().decode() for j in range(sig.InputsLength())]
        outputs = [sig.Outputs(j).Name().decode() for j in range(sig.OutputsLength())]
        signatures[sig.SignatureKey().decode()] = (inputs, outputs)
    return signatures


def signature_problem(content: bytes, input_names: Sequence[str], output_names: Sequence[str]) -> str | None:
    """None if the file's ``serving_default`` signature has exactly these names, else what differs."""
    signatures = file_signatures(content)
    if SIGNATURE_KEY not in signatures:
        return f"a file with the signature(s) {sorted(signatures)} and no '{SIGNATURE_KEY}'"
    inputs, outputs = signatures[SIGNATURE_KEY]
    if sorted(inputs) != sorted(input_names) or sorted(outputs) != sorted(output_names):
        return f"a '{SIGNATURE_KEY}' signature with inputs {sorted(inputs)} and outputs {sorted(outputs)}"
    return None
