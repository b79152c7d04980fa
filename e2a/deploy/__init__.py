"""Running e2a itself in a cluster: its OCI image (deploy/kubernetes/ has the manifests)."""
