"""ServeControl on the session's real Serve: what an update of a running application changes (replica
settings, code version) and how a deploy that cannot start fails (issue 17, "Smaller items")."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.conftest import IMAGE_MODEL, wait_healthy

APP = "serve_control_tests"


@pytest.fixture
def control(serve_http):
    from ray import serve

    from ocm_resources.serve_control import ServeControl

    serve.delete(APP)  # a left-over app of an interrupted run
    yield ServeControl(address=None, http_port=int(serve_http.rsplit(":", 1)[1]))
    serve.delete(APP)


def _app(serve_env, version: str, model: str = f"models:/{IMAGE_MODEL}/1", **options):
    from ocm_ml.serve.deployments import build_app, config_hash

    user_config = serve_env.user_config("image", model)
    options.setdefault("ray_actor_options", {"num_cpus": 0.1})
    return build_app("image", user_config, version=version, **options), config_hash(user_config)


def _replica_ids(control) -> set[str]:
    """The replicas answering now, each asked on its own direct-ingress port."""
    return {httpx.get(f"{url}/health", timeout=30).json()["replica_id"]
            for url in control.urls(APP)["direct"]}


def test_replica_settings_apply_to_a_running_app(control, serve_env):
    first = control.run(APP, *_app(serve_env, "commit-a", num_replicas=1))
    assert first["action"] == "deployed" and len(first["urls"]["direct"]) == 1

    second = control.run(APP, *_app(serve_env, "commit-a", num_replicas=2,
                                    ray_actor_options={"num_cpus": 0.2}))
    assert second["action"] == "reconfigured"
    deployed = control.deployed(APP)
    assert deployed["options"]["num_replicas"] == 2
    assert deployed["options"]["ray_actor_options"]["num_cpus"] == 0.2
    assert control.application(APP)["deployments"][deployed["deployment"]]["replicas"] == {"RUNNING": 2}
    assert len(second["urls"]["direct"]) == 2 and len(_replica_ids(control)) == 2

    autoscaled = {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1}
    control.run(APP, *_app(serve_env, "commit-a", autoscaling_config=autoscaled,
                           ray_actor_options={"num_cpus": 0.2}))
    scaling = control.deployed(APP)["options"]["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 3)
    assert wait_healthy(control.url(APP))["model_uri"] == f"models:/{IMAGE_MODEL}/1"


def test_a_new_code_version_rolls_the_replicas_and_the_same_one_reloads_in_place(control, serve_env):
    control.run(APP, *_app(serve_env, "commit-a"))
    (on_a,) = _replica_ids(control)
    assert control.deployed(APP)["code_version"] == "commit-a"

    rolled = control.run(APP, *_app(serve_env, "commit-b"))
    assert rolled["action"] == "reconfigured" and control.deployed(APP)["code_version"] == "commit-b"
    (on_b,) = _replica_ids(control)
    assert on_b != on_a  # a new replica runs the new code

    reloaded = control.run(APP, *_app(serve_env, "commit-b", model=f"models:/{IMAGE_MODEL}/2"))
    assert reloaded["status"]["model_version"] == "2"
    assert _replica_ids(control) == {on_b}  # same code: the live replica swapped its model


def test_a_first_deploy_that_cannot_load_fails_fast_with_serves_reason(control, serve_env):
    """Checks the error is the one raised as soon as Serve reports the failure ("Serve could not deploy", with
    the replica's reason), never the one raised when the 300 s deadline passes ("is not RUNNING after")."""
    from ocm_resources.serve_control import ServeError

    with pytest.raises(ServeError) as failed:
        control.run(APP, *_app(serve_env, "commit-a", model=f"models:/{IMAGE_MODEL}/99"), timeout_s=300)
    text = str(failed.value)
    assert text.startswith(f"Serve could not deploy {APP!r}"), text
    assert "not RUNNING after" not in text, text
    assert "DEPLOY_FAILED" in text or "UNHEALTHY" in text, text
    assert "99" in text and "failed to start" in text, text  # the replica's own load error, via Serve
