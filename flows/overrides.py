"""One field of a section overridden, every other value of the deployment kept.

Prefect merges a run's parameters with its deployment's at the top level only: a run that sets one
field of a section (``prefect deployment run train/gpu --param training='{"epochs": 3}'``, a
trigger, an API call) replaces the deployment's whole section, and its other fields would fall back
to the model's defaults rather than the deployment's. ``deployment_defaults`` puts them back: the
fields the run gave (pydantic's ``model_fields_set``) over the deployment's own section. Outside a
deployed run (the CLI, a subflow, a test) it changes nothing.
"""

from __future__ import annotations

from pydantic import BaseModel


def deployment_defaults(**sections: BaseModel) -> list[BaseModel]:
    """The sections, in the order given, each completed from this run's deployment's parameters."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    deployment_id = getattr(getattr(context, "flow_run", None), "deployment_id", None)  # this run's own, not a parent's
    if deployment_id is None:
        return list(sections.values())
    with get_client(sync_client=True) as client:
        deployed = client.read_deployment(deployment_id).parameters or {}
    out = []
    for name, section in sections.items():
        base = deployed.get(name)
        if isinstance(base, dict):
            section = type(section).model_validate({**base, **section.model_dump(include=section.model_fields_set)})
        out.append(section)
    return out
