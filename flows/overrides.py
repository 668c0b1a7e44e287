"""The sections a run actually uses: a recipe's, the deployment's, then the fields the run set.

Prefect merges a run's parameters with its deployment's at the top level only: a run that sets one
field of a section (``prefect deployment run train/gpu --param training='{"epochs": 3}'``, a
trigger, an API call) replaces the deployment's whole section, and its other fields would fall back
to the model's defaults rather than the deployment's. ``sections`` puts them back, in layers:

    the recipe's section (``--recipe cpu``; flows.recipes), if the run names one
    < the deployment's own section, in a deployed run
    < the fields the run gave (pydantic's ``model_fields_set``)

Outside a deployed run and without a recipe (the CLI, a subflow, a test) it changes nothing.
"""

from __future__ import annotations

from pydantic import BaseModel


def sections(recipe: str | None = None, **given: BaseModel) -> list[BaseModel]:
    """The sections, in the order given, each completed from the recipe and this run's deployment."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    from flows.recipes import recipe as named

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
