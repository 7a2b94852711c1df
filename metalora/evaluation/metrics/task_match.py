"""An `evaluate` metric module: the share of predictions that match their references.

Loaded with `evaluate.load(<path of this file>)`, so it works without hub access. `mode="option"`
compares chosen options exactly; `mode="text"` applies the kit's normalised exact match
(`metalora.evaluation.scoring.exact_match`: first line, case, punctuation, articles, final number).
"""

import datasets
import evaluate

from metalora.evaluation.scoring import exact_match


class TaskMatch(evaluate.Metric):
    """Accuracy of option choices or normalised exact match of generations."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Share of predictions that match their references (options exactly, text normalised).",
            citation="",
            inputs_description="predictions: list of str; references: list of str; mode: 'option' or 'text'",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str], mode: str = "text") -> dict[str, float]:
        if mode == "option":
            hits = sum(p == r for p, r in zip(predictions, references, strict=True))
        elif mode == "text":
            hits = sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True))
        else:
            raise ValueError(f"task_match: mode must be 'option' or 'text', not {mode!r}")
        return {"match": hits / len(predictions) if predictions else 0.0}
