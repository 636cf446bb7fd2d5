"""cluo's own Kubernetes client (standard-library HTTP, docs/decisions.md) and what both
programs build on it: kubeconfig and in-cluster credentials (config), API paths and
timeouts (resources), the fields every object has (objects), one way to watch
(watch) and Nodes (nodes)."""
