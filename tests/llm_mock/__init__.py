"""Local stand-ins for the LLM providers (the only thing on the internet the agent tests need),
speaking each provider's real protocol: Anthropic Messages, OpenAI Responses and Chat
Completions, Gemini generateContent. `server.py` holds the scripted scenarios and the request
log; one module per protocol answers from them."""
