"""Pure residency and quota evaluation, shared by the admission webhook and reconcile."""
