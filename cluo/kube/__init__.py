"""cluo's own Kubernetes client (standard-library HTTP, docs/decisions.md) and the adapters
both programs use: kubeconfig and in-cluster credentials, Nodes, watches."""
