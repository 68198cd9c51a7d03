"""The HTTP layer: routes, request/response models, problem+json errors, middleware."""
