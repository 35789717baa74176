"""The local cluster's parts, split the way envtest splits its control plane.

base        where state and binaries live, the profile, versions, kubectl
pki         the CA, every component's certificate, kubeconfigs
processes   finding, starting, health-checking and stopping this cluster's processes
components  one `Component` per process: binary, command line, ports, health check
nodes       the simulated fleet, and the images of the real node
lifecycle   up, down, start and stop of one component, status
cli         `python e2e/localcluster.py up|down|status|nodes`

e2e/localcluster.py is the entry point and the interface other code imports.
"""
