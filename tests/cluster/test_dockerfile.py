"""The Dockerfile installs exactly the project's lock (no Docker engine here: the file is parsed). One image
serves the code location and the Ray pods, so its Python and Ray versions are the ones the lock was
made for."""

import fnmatch
import re
import shlex
import sys
import tomllib

import pytest

from tests.cluster.helpers import MODULE, ROOT, load_docs, lock_versions


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not current):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "a continued instruction never ends"
    return out


@pytest.fixture(scope="module")
def dockerfile():
    return instructions((ROOT / "Dockerfile").read_text())


def stages(dockerfile):
    """{stage name: [(instruction, args), ...]} in order; global ARGs under ""."""
    found, name = {"": []}, ""
    for keyword, args in dockerfile:
        if keyword == "FROM":
            name = args.split(" AS ")[-1].strip() if " AS " in args else f"stage{len(found)}"
            found[name] = []
        found[name].append((keyword, args))
    return found


def global_args(dockerfile) -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in stages(dockerfile)[""] if k == "ARG" and "=" in a)


def test_parser_sees_continuations():
    parsed = instructions("FROM a AS b\nRUN x \\\n    # note\n    && y\n")
    assert parsed == [("FROM", "a AS b"), ("RUN", "x && y")]


def test_python_is_the_projects_3_11(dockerfile):
    version = global_args(dockerfile)["PYTHON_VERSION"]
    assert re.fullmatch(r"3\.11\.\d+", version)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11,<3.12"
    assert sys.version_info[:2] == (3, 11)  # the lock was resolved on the same minor version
    bases = [args.split()[0] for keyword, args in dockerfile if keyword == "FROM"]
    built = {name for name in stages(dockerfile) if name}
    external = [b for b in bases if b not in built]
    assert external and all(b.startswith("python:${PYTHON_VERSION}-slim") for b in external), bases


def test_installs_the_lock_with_no_deps(dockerfile):
    copies = [args for keyword, args in dockerfile if keyword == "COPY"]
    assert "requirements.lock /tmp/requirements.lock" in copies
    installs = [args for keyword, args in dockerfile if keyword == "RUN" and "pip install" in args]
    lock_installs = [a for a in installs if "-r /tmp/requirements.lock" in a]
    assert len(lock_installs) == 1
    for command in installs:  # nothing is resolved by pip: every install is --no-deps
        for part in command.split("&&"):
            if "pip install" in part:
                assert "--no-deps" in shlex.split(part), part


def test_the_lock_the_image_gets_has_the_fix_up_and_the_cluster_packages():
    pins = lock_versions()
    assert pins["antlr4-python3-runtime"] == "4.13.2" and pins["omegaconf"] == "2.4.0"
    assert "hydra-core" not in pins  # --no-deps: never installed, so Dagster's selection strings work
    for package in ("dagster", "dagster-k8s", "dagster-ray", "ray", "mlflow", "dvc", "dvc-s3", "boto3",
                    "dagster-postgres", "psycopg2-binary", "torch"):
        assert package in pins, f"{package} is missing from requirements.lock"


def test_ray_version_matches_the_lock_and_the_kuberay_manifests(dockerfile):
    ray = lock_versions()["ray"]
    assert global_args(dockerfile)["RAY_VERSION"] == ray
    check = [a for k, a in dockerfile if k == "RUN" and "ray.__version__" in a]
    assert check and "${RAY_VERSION}" in check[0]  # the build fails if the lock and the ARG disagree
    for path in (ROOT / "deploy" / "kuberay").glob("*.yaml"):
        for doc in load_docs(path):
            spec = doc["spec"].get("rayClusterConfig", doc["spec"])
            assert spec["rayVersion"] == ray, path.name


def test_ocm_itself_and_the_runtime_stage(dockerfile):
    all_stages = stages(dockerfile)
    assert list(all_stages)[-1] == "runtime", "the default build target must be the runtime image"
    build = all_stages["build"]
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    copied = {args.split()[0] for k, args in build if k == "COPY"}
    for pattern in packages["include"]:
        package = pattern.rstrip("*")
        assert package in copied and (ROOT / package).is_dir()
    assert {"pyproject.toml"} <= copied and ("RUN", "pip install --no-deps /src") in build

    runtime = all_stages["runtime"]
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime
    exposed = {int(p) for k, a in runtime if k == "EXPOSE" for p in a.split()}
    assert {3030, 6379, 8265, 8000, 10001} <= exposed
    (cmd,) = [a for k, a in runtime if k == "CMD"]
    import json

    argv = json.loads(cmd)
    assert argv[:3] == ["dagster", "api", "grpc"] and argv[argv.index("-m") + 1] == MODULE
    assert argv[argv.index("-p") + 1] == "3030"
    (values,) = load_docs(ROOT / "deploy" / "helm" / "dagster-values.yaml")
    assert values["dagster-user-deployments"]["deployments"][0]["port"] == 3030
    assert ("USER", "1000") in runtime


def test_dockerignore_keeps_state_out_and_what_the_build_copies_in(dockerfile):
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)

    for path in (".venv", ".ocm", ".git", "ocm_ml/__pycache__/x.pyc", "tests", ".pytest_cache"):
        assert ignored(path), path
    sources = set()
    for keyword, args in dockerfile:
        if keyword == "COPY" and "--from=" not in args:
            sources.update([t for t in args.split() if not t.startswith("--")][:-1])
    assert {"requirements.lock", "pyproject.toml", "README.md", "workspace.yaml", "ocm_ml"} <= sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source), f"{source} is copied by the Dockerfile but excluded by .dockerignore"
