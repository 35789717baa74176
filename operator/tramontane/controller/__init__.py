"""kopf handlers, reconcile (server-side apply, status, events), admission, telemetry."""
