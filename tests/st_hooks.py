"""Schemathesis hooks for test_fuzz.py, loaded through SCHEMATHESIS_HOOKS.

Bodies of binary media types without a serializer of their own (the tar
archives of PUT /v1/vms/{name}/fs/archive) are fuzzed as raw bytes, like
application/octet-stream, instead of stopping the run with "Serialization
not possible"."""

import schemathesis

for media_type in ("application/x-tar", "application/gzip", "application/zip"):
    schemathesis.serializer.alias(media_type, "application/octet-stream")
