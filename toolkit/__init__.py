"""What the steps share: GPT-2 model and tokenizer building, the batch runner, the model registry, built-in tasks."""
