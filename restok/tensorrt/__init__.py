"""Everything TensorRT: the parser-compatibility lint of the graphs (no TensorRT needed), the engine
builder and engine cache, and the TensorRT runtime backend. Imports tensorrt only when a function needs
it, so the lint and the cache checks run anywhere."""
