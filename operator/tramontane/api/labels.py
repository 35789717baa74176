"""Every label and annotation key the operator writes or reads, in one place (KubeRay keeps
its own in utils/constant.go).

Keys under tramontane.dev/ are ours; only the operator may write them on a tenant namespace
(the tenant guard policies). The others are well-known keys of Kubernetes, KubeRay and NVIDIA.
"""

from __future__ import annotations

from typing import Final

# Ours (tramontane.dev/*).
LABEL_PREFIX: Final = "tramontane.dev/"
# The Tenant that owns a namespace, or that a ModelDeployment's children serve.
TENANT_LABEL: Final = "tramontane.dev/tenant"
# The ResidencyPolicy of a tenant namespace (its Tenant's spec.residencyPolicy).
POLICY_LABEL: Final = "tramontane.dev/residency-policy"
# The jurisdiction of that policy, for people and selectors.
JURISDICTION_LABEL: Final = "tramontane.dev/jurisdiction"
# The ModelDeployment that a child (RayService, RayCluster, PodMonitor, Ray pod) belongs to.
DEPLOYMENT_LABEL: Final = "tramontane.dev/model-deployment"
# The operator replica that decides admissions: the webhook Service selects it (the chart).
ADMISSION_LABEL: Final = "tramontane.dev/admission"
# A digest of what the engines load, on the Ray pod templates (render.rayservice).
ENGINE_CONFIG_ANNOTATION: Final = "tramontane.dev/engine-config"

# Kubernetes' recommended labels.
NAME_LABEL: Final = "app.kubernetes.io/name"
INSTANCE_LABEL: Final = "app.kubernetes.io/instance"
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
PART_OF_LABEL: Final = "app.kubernetes.io/part-of"

# Well-known Kubernetes labels and annotations.
REGION_LABEL: Final = "topology.kubernetes.io/region"
ZONE_LABEL: Final = "topology.kubernetes.io/zone"
NAMESPACE_NAME_LABEL: Final = "kubernetes.io/metadata.name"
POD_SECURITY_ENFORCE_LABEL: Final = "pod-security.kubernetes.io/enforce"
POD_SECURITY_ENFORCE_VERSION_LABEL: Final = "pod-security.kubernetes.io/enforce-version"
POD_SECURITY_WARN_LABEL: Final = "pod-security.kubernetes.io/warn"
POD_SECURITY_AUDIT_LABEL: Final = "pod-security.kubernetes.io/audit"
LAST_APPLIED_ANNOTATION: Final = "kubectl.kubernetes.io/last-applied-configuration"

# KubeRay's label of a Ray pod's role (head or worker).
RAY_NODE_TYPE_LABEL: Final = "ray.io/node-type"

# NVIDIA GPU feature discovery's label of a node's GPU model.
GPU_PRODUCT_LABEL: Final = "nvidia.com/gpu.product"
