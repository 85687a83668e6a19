"""flashops.api: the platform's API. Spec types (the single source of truth), CRDs, lineage service.

Layering: this package imports none of model/, trainers/, serving/, operator/.
"""
