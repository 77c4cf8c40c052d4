"""The schema of params.yaml, one module per section (pipeline/settings/<section>.py), each
documented once there; base.py holds the shared field types and errors."""
