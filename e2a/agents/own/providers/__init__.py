"""One module per provider API: anthropic.py, openai.py, gemini.py."""
