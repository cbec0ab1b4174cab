"""Alert gateway: Alertmanager and Grafana webhooks in, Prefect events out, nothing lost.

Prefect's open-source server has no webhooks; this small service authenticates, validates,
deduplicates and durably spools each alert, then forwards it as an `alert.firing` /
`alert.resolved` event that the deployments' triggers in prefect.yaml match.
"""

from alert_gateway.app import create_app
from alert_gateway.settings import GatewaySettings

__all__ = ["GatewaySettings", "create_app"]
