"""The HTTP API: routes per resource, dependencies, wire schemas and error responses."""
