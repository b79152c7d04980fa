"""One module per provider API (anthropic.py, openai.py, gemini.py), and the choice between them.

The vendor is what create's `llm.vendor` says, or else what the model's name or the key's shape
tells (docs/agents.md "Choosing the provider"). An OpenAI-compatible `base_url` without a vendor
is spoken to in Chat Completions, the dialect every compatible server has.
"""

from __future__ import annotations

VENDORS = ("anthropic", "openai", "google", "deepseek")
# When create names no model.
DEFAULT_MODELS = {"anthropic": "claude-sonnet-5-5", "openai": "gpt-5", "google": "gemini-2.5-pro",
                  "deepseek": "deepseek-chat"}


def infer_vendor(model: str | None, key: str) -> str | None:
    """The vendor a model name or key belongs to; None if neither tells."""
    m = (model or "").lower()
    if m.startswith("claude"):
        return "anthropic"
    if m.startswith("gemini"):
        return "google"
    if m.startswith("deepseek"):
        return "deepseek"
    if m.startswith(("gpt-", "o1", "o3", "o4", "chatgpt", "codex")):
        return "openai"
    if key.startswith("sk-ant-"):
        return "anthropic"
    if key.startswith("AIza"):
        return "google"
    if key.startswith("sk-"):
        return "openai"
    return None


def make(vendor: str, model: str | None, key: str, base_url: str, *, policy,
         compatible: bool = False):
    """A Provider (own/llm.py) for the vendor's API at `base_url` (its API root; for an
    OpenAI-compatible server, the URL its users give, usually ending in /v1), whose every
    connection goes through the SSRF guard with `policy` (an e2a.agents.ssrf.Policy)."""
    model = model or DEFAULT_MODELS[vendor]
    common = dict(model=model, key=key, base_url=base_url, policy=policy, max_retries=4,
                  timeout=600.0)
    if vendor == "anthropic":
        from e2a.agents.own.providers.anthropic import AnthropicProvider
        return AnthropicProvider(**common)
    if vendor == "google":
        from e2a.agents.own.providers.gemini import GeminiProvider
        return GeminiProvider(**common)
    from e2a.agents.own.providers.openai import ChatCompletionsProvider, OpenAIResponsesProvider
    if vendor == "openai" and not compatible:
        return OpenAIResponsesProvider(**common)
    return ChatCompletionsProvider(**common)
