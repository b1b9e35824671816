"""The text classifier as an MLflow pyfunc model: the model folder travels as an artifact.

>>> with mlflow.start_run():
...     info = log_text_model(result.best_checkpoint_dir, input_example=["great day"],
...                           registered_model_name="local.tweet-sentiment-classifier")
>>> mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"text": ["great day"]}))
        text     label  confidence
0  great day  positive        0.93

``predict`` takes a DataFrame with a ``text`` column (or a list of strings) and returns a DataFrame with
``text``, ``label`` (name from labels.json) and ``confidence``. Loading needs ``ocm_ml`` importable (it is
installed with ocm); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.pyfunc.model import PythonModel  # where it is defined: mlflow.pyfunc does not re-export it

MODEL_DIR_ARTIFACT = "model_dir"
_RUNTIME_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "pandas", "numpy", "safetensors")


class TextClassifierPyfunc(PythonModel):
    def __init__(self, batch_size: int = 64):
        self.batch_size = batch_size
        self._predictor = None

    def __getstate__(self) -> dict[str, Any]:
        # MLflow loads the model to check the input example, then pickles this object: the loaded predictor
        # stays out of python_model.pkl (the model folder is its artifact; a transformers model that has
        # returned hidden states holds hooks that do not pickle)
        return {**self.__dict__, "_predictor": None}

    def load_context(self, context) -> None:
        from ocm_ml.text.predictor import TextPredictor

        self._predictor = TextPredictor.from_dir(
            context.artifacts[MODEL_DIR_ARTIFACT], batch_size=self.batch_size
        )

    def predict(  # pyright: ignore[reportIncompatibleMethodOverride]  # MLflow types model_input loosely
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        texts = _texts_from(model_input)
        pairs: list[tuple[str, float]] = []
        if texts:
            if self._predictor is None:
                raise RuntimeError(
                    "TextClassifierPyfunc.predict ran before load_context: use mlflow.pyfunc.load_model"
                )
            pairs = self._predictor.predict(texts)
        return pd.DataFrame(
            {
                "text": texts,
                "label": [label for label, _ in pairs],
                "confidence": [float(conf) for _, conf in pairs],
            },
            # pandas' Axes stub does not accept a plain list[str]
            columns=["text", "label", "confidence"],  # pyright: ignore[reportArgumentType]
        )


def _texts_from(model_input) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        if "text" not in model_input.columns:
            raise ValueError(f"input DataFrame needs a 'text' column, got {list(model_input.columns)}")
        column = model_input["text"]
    elif isinstance(model_input, pd.Series):
        column = model_input
    elif isinstance(model_input, dict) and "text" in model_input:
        column = pd.Series(model_input["text"])
    elif isinstance(model_input, Sequence) and not isinstance(model_input, str | bytes):
        column = pd.Series(list(model_input))
    else:
        raise ValueError(
            f"expected a DataFrame with a 'text' column or a list of strings, got {type(model_input)}"
        )
    if bool(column.isna().any()):
        raise ValueError("input has missing texts")
    return [str(t) for t in column.tolist()]


def runtime_requirements(packages: Sequence[str] = _RUNTIME_PACKAGES) -> list[str]:
    """Pinned requirements of the installed runtime (skips pip's slow requirement inference); local build
    tags (``+cu128``) dropped, as an index does not serve them."""
    reqs = []
    for name in packages:
        try:
            reqs.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def log_text_model(
    model_dir: str | Path,
    name: str = "model",
    input_example: Sequence[str] | None = None,
    *,
    registered_model_name: str | None = None,
    **log_model_kwargs: Any,
):
    """``mlflow.pyfunc.log_model`` of ``model_dir`` (model + tokenizer + labels.json); returns the ModelInfo.

    Logs into the active run (MLflow starts one if there is none). ``input_example`` texts give the model a
    signature (input column ``text``; output ``text``, ``label``, ``confidence``).
    """
    model_dir = Path(model_dir)
    if not (model_dir / "labels.json").is_file() or not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: expected a model folder with config.json and labels.json")
    example = None if input_example is None else pd.DataFrame({"text": [str(t) for t in input_example]})
    kwargs: dict[str, Any] = {"pip_requirements": runtime_requirements()}
    kwargs.update(log_model_kwargs)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=TextClassifierPyfunc(),
        artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
        input_example=example,  # pyright: ignore[reportArgumentType]  # MLflow: None is its default
        registered_model_name=registered_model_name,
        **kwargs,
    )
