"""`gptserve bench`: our engines side by side with Hugging Face transformers and onnxruntime-genai, in one run."""
