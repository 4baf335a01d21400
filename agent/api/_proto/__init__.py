"""Generated from agent/api/grpc_service.proto by `python -m agent.api._gen`."""
