"""`aibot serve`: HTTP/JSON API, WebSocket events, Prometheus /metrics and the dashboard page."""
