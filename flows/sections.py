"""The flows' parameters, each described once: the sections, the shared parameters, and how a run
resolves the sections it uses.

* Sections (pydantic models, shown as typed groups of the run form in the Prefect UI and as option
  groups of ``brats COMMAND --help``), each defined beside the code it configures:
  ``unet.preprocess.Preprocessing`` (``data``), ``unet.model.UNetConfig`` (``network``),
  ``unet.config.TrainConfig`` (``training``), ``unet.predict.Prediction`` (``prediction``); the
  named sets of them are ``flows.recipes``.
* ``PARAMETERS``: the description of every parameter several flows take (``store_url``,
  ``registry_url``, ``version``, …); ``@documented`` adds them to a flow's docstring, where Prefect
  and the command line read descriptions.
* ``sections``: the sections a run actually uses: a recipe's, the deployment's, then the fields the
  run set. Prefect merges a run's parameters with its deployment's at the top level only: a run that
  sets one field of a section (``prefect deployment run train/gpu --param training='{"epochs": 3}'``,
  a trigger, an API call) replaces the deployment's whole section, and its other fields would fall
  back to the model's defaults rather than the deployment's. ``sections`` puts them back, in layers:

      the recipe's section (``--recipe cpu``; flows.recipes), if the run names one
      < the deployment's own section, in a deployed run
      < the fields the run gave (pydantic's ``model_fields_set``)

  Outside a deployed run and without a recipe (the CLI, a subflow, a test) it changes nothing.
"""

from __future__ import annotations

import inspect

from pydantic import BaseModel

from flows.recipes import recipe as named
from storage.cases import NAMING_HELP

PARAMETERS = {
    "raw": "raw roots in any BraTS layout ({HGG,LGG}/<case>/, <case>/) or case folders",
    "store_url": "slice store: a local path or an fsspec URL (s3://…)",
    "registry_url": "model registry: a local path or an fsspec URL "
    "(default: $BRATS_MODELS, else $BRATS_STORAGE/models as deployed, else runs/models)",
    "version": "model version, 'latest', or empty for the best",
    "out": "output folder",
    "naming": NAMING_HELP,
    "et_label": "label written for enhancing tumour: 4 (BraTS up to 2021) or 3 (2023+); empty: the input's edition's",
    "data": "preprocessing and split",
    "network": "the U-Net",
    "training": "the training run",
    "prediction": "how scans are segmented",
    "recipe": "start from a named recipe's sections (paper, cpu, gpu: flows.recipes); the fields given still apply",
}


def documented(fn):
    """Add the descriptions of the shared parameters ``fn`` takes (``PARAMETERS``) to its docstring's Args."""
    names = [n for n in inspect.signature(fn).parameters if n in PARAMETERS]
    doc = inspect.cleandoc(fn.__doc__ or "")
    if "Args:" not in doc:
        doc += "\n\nArgs:"
    own = doc.split("Args:", 1)[1]
    lines = [f"    {n}: {PARAMETERS[n]}" for n in names if f"    {n}:" not in own]
    head, args = doc.split("Args:", 1)
    fn.__doc__ = head + "Args:\n" + "\n".join(lines) + ("\n" + args.strip("\n") if args.strip() else "")
    return fn


def sections(recipe: str | None = None, **given: BaseModel) -> list[BaseModel]:
    """The sections, in the order given, each completed from the recipe and this run's deployment."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    chosen = named(recipe).model_dump() if recipe else {}
    layers = {name: dict(chosen.get(name) or {}) for name in given}
    context = FlowRunContext.get()
    deployment_id = getattr(getattr(context, "flow_run", None), "deployment_id", None)  # this run's own, not a parent's
    if deployment_id is not None:
        with get_client(sync_client=True) as client:
            deployed = client.read_deployment(deployment_id).parameters or {}
        for name in given:
            if isinstance(deployed.get(name), dict):
                layers[name].update(deployed[name])
    return [
        type(section).model_validate({**layers[name], **section.model_dump(include=section.model_fields_set)})
        if layers[name]
        else section
        for name, section in given.items()
    ]
