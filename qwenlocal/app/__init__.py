"""The user's side: `generate`, chat, the OpenAI-compatible server, and the CLI pieces they share."""
