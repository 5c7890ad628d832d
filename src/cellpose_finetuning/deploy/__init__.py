"""Deployment: the embedded local stack (SeaweedFS + Hypha) and serving the service on it.

``stack`` supervises the two servers; ``serve`` registers the service on them
(or on an existing Hypha server); ``testing`` starts throwaway stacks for tests.
Nothing here is imported by the lower layers.
"""
