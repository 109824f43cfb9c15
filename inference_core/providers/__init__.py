"""Backend dialects: each provider translates between the OpenAI API and one backend."""
