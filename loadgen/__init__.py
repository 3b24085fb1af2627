"""Load generation against Andes Serve or any OpenAI-compatible server."""
