"""Running the node: the serve process and its resources, supervision, housekeeping, HTTP health and
metrics, logging."""
