# SPDX-License-Identifier: Apache-2.0
"""The deployment files pass the checkers SREs run: hadolint on every Dockerfile,
``docker-compose config`` on the compose file, and every manifest ``kubectl kustomize``
renders against Kubernetes' schemas (kubernetes-validate, strict) or, for custom
resources, against the operators' own CRD schemas vendored in deploy/kubernetes/crd-schemas.

The tools come from ``make setup`` (the dev virtualenv and .venv-tools); a missing one
fails these tests, never skips them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUSTOMIZATION = DEPLOY / "kubernetes"
CRD_SCHEMAS = KUSTOMIZATION / "crd-schemas"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
DOCKERFILES = sorted(
    p for p in (DEPLOY / "docker").glob("Dockerfile*") if p.suffix != ".dockerignore"
)
VENV_BIN = Path(sys.executable).parent
TOOLS_BIN = ROOT / ".venv-tools" / "bin"


def tool(directory: Path, name: str) -> Path:
    path = directory / name
    assert path.is_file(), f"{path} missing: run `make setup`"
    return path


def run(*argv: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@cache
def rendered_text() -> str:
    done = run(tool(TOOLS_BIN, "kubectl"), "kustomize", KUSTOMIZATION)
    assert done.returncode == 0, done.stderr
    return done.stdout


def rendered() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(rendered_text()) if d]


def strict(schema: Any) -> Any:
    """A CRD schema as the API server applies it: fields it does not declare are not
    kept (structural pruning), so here they are errors, like kubernetes-validate --strict."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    made = {k: strict(v) for k, v in schema.items()}
    closed = "properties" in made and "additionalProperties" not in made
    if closed and not made.get("x-kubernetes-preserve-unknown-fields"):
        made["additionalProperties"] = False
    return made


def crd_schema(document: dict[str, Any]) -> Path:
    group, _, version = document["apiVersion"].rpartition("/")
    return CRD_SCHEMAS / f"{document['kind'].lower()}.{group}.{version}.json"


class TestDockerfiles:
    """hadolint finds nothing in any Dockerfile."""

    def test_there_are_a_cpu_and_a_cuda_image(self) -> None:
        assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.cuda"]

    @pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
    def test_hadolint_passes(self, dockerfile: Path) -> None:
        done = run(tool(VENV_BIN, "hadolint"), dockerfile)
        assert done.returncode == 0, done.stdout + done.stderr

    def test_a_bad_dockerfile_fails(self, tmp_path: Path) -> None:
        # Given a Dockerfile with an unpinned base and a root user
        bad = tmp_path / "Dockerfile"
        bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
        # Then hadolint fails it, so a pass above means something
        assert run(tool(VENV_BIN, "hadolint"), bad).returncode != 0


class TestCompose:
    """docker-compose accepts the compose file as written."""

    def test_config_is_valid(self) -> None:
        compose = tool(TOOLS_BIN, "docker-compose")
        done = run(compose, "-f", COMPOSE, "config", "-q", cwd=COMPOSE.parent)
        assert done.returncode == 0, done.stderr
        assert "not set" not in done.stderr, done.stderr

    def test_an_invalid_file_fails(self, tmp_path: Path) -> None:
        bad = tmp_path / "compose.yaml"
        # Given a compose file with a misspelt option
        bad.write_text("services:\n  a:\n    image: x\n    imagee: y\n")
        done = run(tool(TOOLS_BIN, "docker-compose"), "-f", bad, "config", "-q", cwd=tmp_path)
        # Then docker-compose refuses it, so a pass above means something
        assert done.returncode != 0
        assert "imagee" in done.stderr


class TestKubernetesManifests:
    """Every rendered manifest is valid for its kind."""

    def test_builtin_kinds_pass_kubernetes_validate_strict(self, tmp_path: Path) -> None:
        manifest = tmp_path / "rendered.yaml"
        manifest.write_text(rendered_text())
        done = run(tool(VENV_BIN, "kubernetes-validate"), "--strict", "--quiet", manifest)
        assert done.returncode == 0, done.stdout + done.stderr
        # Then what it could not check is exactly the custom resources, checked below
        unchecked = {
            line.split("kind ")[1].split(" with")[0]
            for line in (done.stdout + done.stderr).splitlines()
            if "Couldn't find schema" in line
        }
        custom = {d["kind"] for d in rendered() if "." in d["apiVersion"].split("/")[0]}
        assert unchecked == custom

    def test_custom_resources_match_their_crd_schemas(self) -> None:
        custom = [d for d in rendered() if "." in d["apiVersion"].split("/")[0]]
        assert {d["kind"] for d in custom} >= {"Kafka", "KafkaTopic", "KafkaUser", "EMQX"}
        for document in custom:
            path = crd_schema(document)
            assert path.is_file(), f"no vendored schema for {document['kind']}"
            # OpenAPI 3.0 schemas are JSON Schema draft 4 in what matters here. The CRDs'
            # patterns are Go regular expressions; those on fields we set compile in Python.
            validator = jsonschema.Draft4Validator(strict(json.loads(path.read_text())))
            errors = [
                f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)
            ]
            assert errors == [], f"{document['kind']} {document['metadata']['name']}"

    def test_the_crd_check_catches_an_unknown_field(self) -> None:
        # Given a KafkaTopic with a misspelt field
        (topic,) = [d for d in rendered() if d["kind"] == "KafkaTopic"][:1]
        wrong = {**topic, "spec": {**topic["spec"], "partition": 3}}
        validator = jsonschema.Draft4Validator(strict(json.loads(crd_schema(topic).read_text())))
        # Then the vendored schema rejects it
        assert [e.message for e in validator.iter_errors(wrong)] != []

    def test_no_secret_value_is_written(self) -> None:
        # Given every container and every object in the render
        documents = rendered()
        assert not [d for d in documents if d["kind"] == "Secret"]
        for document in documents:
            for container in containers(document):
                for env in container.get("env", []):
                    secretish = any(w in env["name"] for w in ("PASSWORD", "SECRET", "_KEY"))
                    # Then secrets come by reference (or name a file), never as a value
                    if secretish and "value" in env:
                        assert env["value"].startswith("/etc/"), env
                    if env["name"] == "PARKPOOL_KAFKA_CONFIG":
                        assert "sasl.password=$(KAFKA_PASSWORD)" in env["value"]


def containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    pod = document.get("spec", {}).get("template", {}).get("spec", {})
    return list(pod.get("containers", []))
