"""A registered ocm image model works in plain MLflow: raw 0-255 pixels in (784 flat or 28x28), class id,
name and confidence out, from a process that imports no ocm module, through the Python API and the
`mlflow models predict` command; and it answers as ocm's own predictor does."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.registry_helpers import CLASSES, image_split

PLAIN_MLFLOW = textwrap.dedent(
    """
    import json, sys
    import mlflow, pandas as pd
    mlflow.set_tracking_uri(sys.argv[1])
    model = mlflow.pyfunc.load_model(sys.argv[2])
    images = json.loads(open(sys.argv[3]).read())
    out = model.predict(pd.DataFrame({"image": images}))
    print(json.dumps({"class_id": out["class_id"].tolist(), "class_name": out["class_name"].tolist(),
                      "confidence": out["confidence"].tolist(),
                      "signature_inputs": [c["name"] for c in model.metadata.signature.inputs.to_dict()],
                      "ocm_modules": sorted(m for m in sys.modules if m.split(".")[0].startswith("ocm"))}))
    """
)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    import mlflow
    import torch

    from ocm_ml.vision.predictor import ImagePredictor, build_resnet18
    from ocm_ml.vision.registered import log_image_model

    root = tmp_path_factory.mktemp("registered")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    torch.manual_seed(0)
    predictor = ImagePredictor(build_resnet18(10), mean=0.3, std=0.35, class_names=CLASSES)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("registered", artifact_location=(root / "artifacts").as_uri())
    old_tracking, old_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment):
            info = log_image_model(predictor)
        version = mlflow.register_model(info.model_uri, "t.fashion-mnist-classifier")
        client.set_registered_model_alias("t.fashion-mnist-classifier", "champion", version.version)
    finally:
        mlflow.set_tracking_uri(old_tracking)
        mlflow.set_registry_uri(old_registry)
    return root, uri, predictor


def _images(root):
    images = image_split(6, 3).images
    payload = [images[i].tolist() if i % 2 else images[i].reshape(-1).tolist() for i in range(len(images))]
    path = root / "images.json"
    path.write_text(json.dumps(payload))
    return images, path


def _clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "PYTHONPATH": ""}


def test_plain_mlflow_predicts_raw_pixels_without_ocm(registered, tmp_path):
    root, uri, predictor = registered
    images, path = _images(tmp_path)
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_MLFLOW)
    out = subprocess.run([sys.executable, str(script), uri, "models:/t.fashion-mnist-classifier@champion",
                          str(path)], capture_output=True, text=True, cwd=tmp_path, env=_clean_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["ocm_modules"] == []
    assert answer["signature_inputs"] == ["image"]
    ids, confidences = predictor.predict(images.astype(np.float32))
    assert answer["class_id"] == ids.tolist()
    assert answer["class_name"] == [CLASSES[i] for i in ids]
    assert np.allclose(answer["confidence"], confidences, atol=1e-5)


def test_mlflow_models_predict_command(registered, tmp_path):
    root, uri, predictor = registered
    images, _ = _images(tmp_path)
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"dataframe_split": {
        "columns": ["image"], "data": [[img.reshape(-1).tolist()] for img in images]}}))
    output = tmp_path / "out.json"
    env = {**_clean_env(), "MLFLOW_TRACKING_URI": uri}
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "predict",
                          "-m", "models:/t.fashion-mnist-classifier/1", "-i", str(request), "-t", "json",
                          "-o", str(output), "--env-manager", "local"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    predictions = json.loads(output.read_text())["predictions"]
    ids, _ = predictor.predict(images.astype(np.float32))
    assert [p["class_id"] for p in predictions] == ids.tolist()


def test_bad_pixels_are_refused_with_a_clear_error():
    from ocm_ml.vision.predictor import pixels_from

    with pytest.raises(ValueError, match="784 pixel values"):
        pixels_from({"image": [[1, 2, 3]]})
    with pytest.raises(ValueError, match="0-255"):
        pixels_from({"image": [[300] * 784]})
    with pytest.raises(ValueError, match="'image' column"):
        import pandas as pd

        pixels_from(pd.DataFrame({"pixels": [[0] * 784]}))
