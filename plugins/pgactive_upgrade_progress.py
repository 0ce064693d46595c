"""The upgrades' progress API and page in the Airflow UI (include/pgactive_upgrade/airflow/progress_api.py).

Every task process loads every plugin (for their macros), so this file imports nothing heavy: the API and its
imports (FastAPI, the auth manager, about 0.4 s of CPU) load on the API server's first request to it.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin


class ProgressApi:
    """An ASGI app that builds the progress API on its first request (a mounted app gets no lifespan events)."""

    app = None

    async def __call__(self, scope, receive, send) -> None:
        if ProgressApi.app is None:
            from pgactive_upgrade.airflow.progress_api import app

            ProgressApi.app = app
        await ProgressApi.app(scope, receive, send)


class PgactiveUpgradeProgressPlugin(AirflowPlugin):
    name = "pgactive_upgrade_progress"
    fastapi_apps = [{"app": ProgressApi(), "url_prefix": "/pgactive-upgrade", "name": "pgactive upgrade progress"}]
    external_views = [{
        "name": "PostgreSQL upgrades",
        "href": "/pgactive-upgrade/ui",
        "url_route": "pgactive-upgrades",
        "destination": "nav",
        "category": "browse",
    }]
