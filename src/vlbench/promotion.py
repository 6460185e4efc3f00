"""Model registry: each evaluated variant becomes a new version of the registered model named after
it, and the alias ``champion`` moves to it only when it beats the current champion (issue #15, item 2).

The comparison is the variant's headline test metric (``HEADLINE``: rsum for alignment, CIDEr for
captioners), recorded on each version as tags ``headline_metric`` and ``headline_value``, and only
on the same dataset: tag ``dataset`` (params ``data.name``; ``data_root`` is recorded too). A champion
from another dataset is not compared, and the alias stays where it is (one line says so): scores on
different test sets do not rank models. A version beats the champion when its value is strictly
higher; the first version of a name becomes champion. Queued DVC experiments evaluate in parallel:
the evaluate stage holds a file lock around this (one machine).
"""
from __future__ import annotations

import sys

CHAMPION = "champion"
HEADLINE = {"alignment": "rsum", "captioning": "CIDEr"}


def _say(line: str) -> None:
    print(f"vlbench: {line}", file=sys.stderr)


def current_champion(client, name: str):
    """The model version that holds the alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:  # no such alias, or no such registered model yet
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise
        return None


def register_and_promote(client, run_id: str, name: str, family: str, metrics: dict, dataset: str,
                         data_root: str = "", artifact_path: str = "model") -> tuple[str, bool]:
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of ``name``; move ``champion`` to
    it when it wins. -> (the new version, whether it is now the champion)."""
    from mlflow.exceptions import MlflowException

    metric = HEADLINE[family]
    value = float(metrics[metric])
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    tags = {"dataset": dataset, "data_root": data_root, "headline_metric": metric, "headline_value": repr(value)}
    version = client.create_model_version(name, source, run_id=run_id, tags=tags).version
    champ = current_champion(client, name)
    here = f"{name} version {version} ({metric} {value:.2f} on {dataset})"
    if champ is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        _say(f"{here} is the first {CHAMPION}")
        return version, True
    if champ.tags.get("dataset") != dataset:
        _say(f"{here}: {CHAMPION} is version {champ.version}, evaluated on {champ.tags.get('dataset')!r}, not "
             f"compared; alias left where it is (`mlflow` client set_registered_model_alias to move it)")
        return version, False
    best = float(champ.tags.get("headline_value", "-inf"))
    if value > best:
        client.set_registered_model_alias(name, CHAMPION, version)
        _say(f"{here} beats {CHAMPION} version {champ.version} ({best:.2f}): it is the {CHAMPION} now")
        return version, True
    _say(f"{here} does not beat {CHAMPION} version {champ.version} ({best:.2f}): alias left there")
    return version, False
