"""The declared dependencies hold together: conda.yaml (the environment `mlflow run` builds) names every runtime
package pyproject.toml does, PostgreSQL's driver included, with the same floors."""

import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def by_name(specs) -> dict:
    reqs = [Requirement(s) for s in specs]
    return {canonicalize_name(r.name): r for r in reqs}


def test_conda_yaml_names_the_runtime_packages_of_pyproject_with_their_floors():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = by_name(project["dependencies"] + project["optional-dependencies"]["postgres"])
    (pip,) = [
        d["pip"] for d in yaml.safe_load((ROOT / "conda.yaml").read_text())["dependencies"] if isinstance(d, dict)
    ]
    conda = by_name(p for p in pip if not p.startswith("-e"))
    assert conda.keys() == runtime.keys()
    for name, req in runtime.items():
        assert conda[name].specifier == req.specifier, name
        assert conda[name].extras == req.extras, name
    # what the features need: PostgreSQL through psycopg 3 (SQLAlchemy 2.1's default driver), system metrics
    assert {"psycopg", "sqlalchemy", "psutil", "nvidia-ml-py"} <= conda.keys()
    assert conda["sqlalchemy"].specifier.contains("2.1.0") and not conda["sqlalchemy"].specifier.contains("2.0.99")
