"""Tools for testing diffkiln and what it produces: the bundle fuzzer (:mod:`.bundle_fuzz`)."""
