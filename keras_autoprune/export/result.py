"""`ExportResult`: what an export wrote and how well it matches Keras."""

from __future__ import annotations

import dataclasses
import pathlib


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """An exported file (or SavedModel directory) and its verification figures.

    The figures compare the exported model with the Keras model on the same
    ``num_samples`` sample inputs (see `keras_autoprune.export.verify`).

    Attributes:
        path: the ``.tflite`` file, or the SavedModel version directory.
        format: ``"tflite"`` or ``"saved_model"``.
        quantize: ``None`` (float32), ``"dynamic"``, ``"float16"`` or ``"int8"``.
        size_bytes: size of the file (of all files under the directory).
        max_abs_error: ``max |exported - keras|`` over all outputs and
            samples; None when the file could not be run (Flex ops).
        relative_error: ``max_abs_error / max |keras|``; None likewise.
        top1_agreement: fraction of samples whose arg-max over the last axis
            agrees with Keras (the lowest over the outputs that have more
            than one class); None when no output has a class axis.
        num_samples: how many samples were compared.
        verified: whether the file was run and compared at all.
        flex_ops: TensorFlow Select (Flex) ops in the file (only with
            ``allow_flex=True``).
        note: why verification was skipped, when it was; or how a float32
            file beyond the tolerance was verified against float64
            (`keras_autoprune.export.rounding`).
    """

    path: pathlib.Path
    format: str
    quantize: str | None
    size_bytes: int
    max_abs_error: float | None
    relative_error: float | None
    top1_agreement: float | None
    num_samples: int
    verified: bool = True
    flex_ops: tuple[str, ...] = ()
    note: str = ""

    def summary(self) -> str:
        """One human-readable line per figure.

        Example:

        >>> print(ExportResult(pathlib.Path("m.tflite"), "tflite", None, 2048,
        ...                    1e-7, 2e-7, 1.0, 8).summary())
        path            m.tflite
        format          tflite (float32)
        size            2.0 KiB (2,048 bytes)
        max abs error   1e-07
        relative error  2e-07
        top-1 agreement 100.00% (8 samples)
        """
        def figure(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3g}"

        agreement = "n/a" if self.top1_agreement is None else f"{100 * self.top1_agreement:.2f}%"
        lines = [
            f"path            {self.path}",
            f"format          {self.format} ({self.quantize or 'float32'})",
            f"size            {self.size_bytes / 1024:.1f} KiB ({self.size_bytes:,} bytes)",
            f"max abs error   {figure(self.max_abs_error)}",
            f"relative error  {figure(self.relative_error)}",
            f"top-1 agreement {agreement} ({self.num_samples} samples)",
        ]
        if self.flex_ops:
            lines.append(f"flex ops        {', '.join(self.flex_ops)}")
        if not self.verified:
            lines.append(f"not verified    {self.note}")
        elif self.note:
            lines.append(f"note            {self.note}")
        return "\n".join(lines)
