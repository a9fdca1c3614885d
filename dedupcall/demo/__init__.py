"""``dedupcall demo``: several service instances, one slow upstream, one call per key.

``runner`` drives it (and draws it with rich, from the ``cli`` extra); ``local`` finds or
starts a Redis, ``upstream`` is the counting HTTP upstream and ``instance`` one instance
process. Nothing is imported here, so the examples can use ``local`` and ``upstream``
without the ``cli`` extra.
"""
