"""Kubernetes operator for ChatStreamDeployment resources (chatstream.io/v1alpha1)."""
