"""Stage 04_export: the tuned model as an HF folder, GGUF files and an Ollama Modelfile; GGUF -> HF conversion."""
