"""The runtime of quantized models: packed layers, the int4 kernel, the GPTQ checkpoint layout.

It lives in `llm` (below compression) because loading, evaluating and serving a quantized model
needs it without any compression code; the quantizers in `compress.quantize` produce what it runs."""
