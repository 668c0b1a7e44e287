"""Deployments that name a recipe carry its sections in full, so the UI's run form runs the recipe.

    python -m flows.cli.deployments        (deploy/bootstrap.sh runs it right after ``prefect deploy``)

The UI's run form shows a deployment's parameters over the flow's schema defaults and submits every
field of every section; a field a run gives wins over the recipe (``flows.sections.sections``). With
only ``recipe: cpu`` in a deployment, the form would show the sections' own defaults (the paper
network, 20 epochs, no folds) and a run submitted unchanged would train that. So each deployment
whose parameters name a recipe gets that recipe's sections written into its parameters, with the
fields the deployment itself sets (``data: *data`` in prefect.yaml) kept over the recipe's: the form
then shows what the deployment runs, and a field changed there is the only change.
"""

from __future__ import annotations

from flows.recipes import recipe as named

SECTIONS = ("data", "network", "training")


def resolved(parameters: dict, schema: dict) -> dict:
    """``parameters`` with the sections of the recipe they name (that the flow takes, per its parameter
    ``schema``) filled in; the fields they already give win. Without a recipe: unchanged."""
    if not parameters.get("recipe"):
        return parameters
    chosen = named(parameters["recipe"])
    taken = schema.get("properties", {})
    sections = {
        name: {**getattr(chosen, name).model_dump(mode="json"), **(parameters.get(name) or {})}
        for name in SECTIONS
        if name in taken
    }
    return {**parameters, **sections}


def resolve_all() -> list[str]:
    """Rewrite the parameters of every deployment on the configured server that names a recipe;
    returns their names (``flow/deployment``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    done = []
    with get_client(sync_client=True) as client:
        for d in client.read_deployments():
            parameters = resolved(d.parameters or {}, d.parameter_openapi_schema or {})
            if parameters != (d.parameters or {}):
                client.update_deployment(d.id, DeploymentUpdate(parameters=parameters))
                flow = client.read_flow(d.flow_id).name
                done.append(f"{flow}/{d.name} ({parameters['recipe']})")
    return done


if __name__ == "__main__":
    names = resolve_all()
    print(f"recipe sections written into {len(names)} deployment(s): {', '.join(names) or 'none'}")
