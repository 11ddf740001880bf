"""Media bytes in and out: encoders, invisible watermark, provenance metadata, Content Credentials.

Nothing in this package imports torch or Ray, not even inside functions (tensors are duck-typed),
so `renderfleet verify`, reports and other file-only tools use it without the render stack.
"""
