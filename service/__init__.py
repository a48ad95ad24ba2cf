"""dflash-serve's serving layer: OpenAI-compatible HTTP API, continuous batching, metrics,
Ray Serve deployments (colocated and disaggregated placements). See service/README.md.
Application builder for Ray Serve: `service.deployments:build_app`."""
