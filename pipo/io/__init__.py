"""Reading models: specs, safetensors and GGUF readers, tokenizer, the offload store."""
